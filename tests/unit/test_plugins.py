import sys
import textwrap

import pytest

from slime_wf.plugins import PluginError, load_function


@pytest.fixture
def plugin_pkg(tmp_path, monkeypatch):
    pkg = tmp_path / "myplugins"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "filters.py").write_text(
        textwrap.dedent(
            """
            NOT_CALLABLE = 3

            def my_filter(args, rollout_id, buffer, num_samples):
                return buffer[:num_samples]

            def two_args(args, samples):
                return True

            class Holder:
                @staticmethod
                def method(args, rollout_id, buffer, num_samples):
                    return []
            """
        )
    )
    (pkg / "broken.py").write_text("import a_dependency_that_is_not_installed\n")
    (pkg / "raises.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "myplugins"
    for name in [m for m in sys.modules if m.startswith("myplugins")]:
        del sys.modules[name]


@pytest.mark.parametrize("path", ["myplugins.filters.my_filter", "myplugins.filters:my_filter"])
def test_loads_both_path_styles(plugin_pkg, path):
    fn = load_function(path, num_positional=4)
    assert fn(None, 0, [1, 2, 3], 2) == [1, 2]


def test_loads_nested_attribute(plugin_pkg):
    assert load_function("myplugins.filters.Holder.method", num_positional=4)(None, 0, [], 1) == []
    assert load_function("myplugins.filters:Holder.method")(None, 0, [], 1) == []


def test_loads_library_function():
    from slime_wf.rollout.data_source import pop_first

    assert load_function("slime_wf.rollout.data_source.pop_first", num_positional=4) is pop_first


@pytest.mark.parametrize(
    "path, expected",
    [
        ("nosuchpkg.mod.fn", r"'nosuchpkg.mod.fn': module 'nosuchpkg' not found"),
        ("myplugins.nosuchmod.fn", r"module 'myplugins.nosuchmod' not found"),
        ("myplugins.filters.missing", r"'myplugins.filters' has no attribute 'missing'"),
        ("myplugins.filters:missing", r"'myplugins.filters' has no attribute 'missing'"),
        ("myplugins.filters.NOT_CALLABLE", r"is a int, not a callable"),
        (
            "myplugins.broken.fn",
            r"importing module 'myplugins.broken' failed: No module named 'a_dependency_that_is_not_installed'",
        ),
        ("myplugins.raises.fn", r"importing module 'myplugins.raises' raised RuntimeError: boom at import"),
        ("justaname", r"expected a dotted path"),
        ("", r"non-empty string"),
    ],
)
def test_errors_name_path_and_reason(plugin_pkg, path, expected):
    with pytest.raises(PluginError, match=expected):
        load_function(path)


def test_wrong_signature_is_rejected_with_the_actual_signature(plugin_pkg):
    with pytest.raises(PluginError, match=r"wrong signature two_args\(args, samples\).*4 positional"):
        load_function("myplugins.filters.two_args", num_positional=4, kind="buffer filter")
