"""Loading user functions by dotted path (`pkg.mod.func` or `pkg.mod:func`).

Reward functions, filters, buffer filters and generate functions are plugins with small,
stable signatures (slime's). A wrong path fails at load time with an error that names the
path and says why, instead of deep inside a rollout.

Plugin files written for slime import `slime.*` (`from slime.utils.types import Sample`). When slime
itself is not installed, loading any plugin first installs an import alias: `slime` and every
`slime.X` resolve to `slime_wf.compat` and `slime_wf.compat.X`, the same module objects under both
names (so `slime.utils.types.Sample` is `slime_wf.types.Sample`). When slime is installed, nothing is
aliased: `slime.*` is slime's own code, which slime-wf never shadows.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

ALIAS = "slime"
ALIAS_TARGET = "slime_wf.compat"


class _SlimeAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `slime` and `slime.*` as the modules of `slime_wf.compat` of the same relative name.

    The loader puts the target module itself into `sys.modules` under the alias name (the import
    system reads the module back from there after `exec_module`), so nothing is imported twice.
    """

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != ALIAS and not fullname.startswith(ALIAS + "."):
            return None
        real = ALIAS_TARGET + fullname[len(ALIAS) :]
        try:
            real_spec = importlib.util.find_spec(real)
        except ModuleNotFoundError:
            return None
        if real_spec is None:
            return None  # the import fails as usual: "No module named 'slime.x'"
        return importlib.machinery.ModuleSpec(
            fullname, self, is_package=real_spec.submodule_search_locations is not None
        )

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        name = module.__spec__.name if module.__spec__ else module.__name__
        sys.modules[name] = importlib.import_module(ALIAS_TARGET + name[len(ALIAS) :])


_alias: _SlimeAlias | None = None


def install_slime_alias() -> bool:
    """Make `import slime...` give slime-wf's implementations, unless slime itself is installed.

    Returns whether the alias is in place. Idempotent; called by `load_function` before each load.
    """
    global _alias
    if _alias is not None:
        return True
    if ALIAS in sys.modules or importlib.util.find_spec(ALIAS) is not None:
        return False  # the real slime (or another package of that name): never shadowed
    _alias = _SlimeAlias()
    # first: the path finder would otherwise load `slime.x` a second time from the alias package's folder
    sys.meta_path.insert(0, _alias)
    return True


class PluginError(ImportError):
    """A plugin path that cannot be loaded or called as required."""


def _import_module(path: str, module_name: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        # Only "this module does not exist" is a path error; a module that exists but fails to
        # import one of its own dependencies is reported as such.
        if err.name is not None and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise PluginError(f"plugin {path!r}: module {module_name!r} not found ({err})") from err
        raise PluginError(f"plugin {path!r}: importing module {module_name!r} failed: {err}") from err
    except Exception as err:
        raise PluginError(
            f"plugin {path!r}: importing module {module_name!r} raised {type(err).__name__}: {err}"
        ) from err


def _resolve(path: str) -> Any:
    if not isinstance(path, str) or not path.strip():
        raise PluginError(f"plugin path must be a non-empty string like 'pkg.mod.func', got {path!r}")
    path = path.strip()
    if ":" in path:
        module_name, _, attr_path = path.partition(":")
        if not module_name or not attr_path:
            raise PluginError(f"plugin {path!r}: expected 'pkg.mod:func'")
        obj = _import_module(path, module_name)
        attrs = attr_path.split(".")
    else:
        parts = path.split(".")
        if len(parts) < 2:
            raise PluginError(f"plugin {path!r}: expected a dotted path 'pkg.mod.func' or 'pkg.mod:func'")
        # Import the longest prefix that is a module; the rest are attributes.
        obj, attrs, deepest_missing = None, [], None
        for cut in range(len(parts) - 1, 0, -1):
            module_name = ".".join(parts[:cut])
            try:
                obj = _import_module(path, module_name)
            except PluginError as err:
                if "not found" in str(err) and cut > 1:
                    deepest_missing = deepest_missing or err
                    continue
                raise
            attrs = parts[cut:]
            break
    for i, attr in enumerate(attrs):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            if i == 0 and ":" not in path and deepest_missing is not None:
                raise deepest_missing from None
            owner = path.replace(":", ".").rsplit(".", len(attrs) - i)[0]
            raise PluginError(f"plugin {path!r}: {owner!r} has no attribute {attr!r}") from None
    return obj


def load_function(
    path: str, *, num_positional: int | None = None, kind: str = "plugin"
) -> Callable[..., Any]:
    """Import and return the callable at `path`.

    `num_positional`, when given, is how many positional arguments the caller passes; a function
    that cannot accept them is rejected here with its actual signature in the message.
    """
    install_slime_alias()
    obj = _resolve(path)
    if not callable(obj):
        raise PluginError(f"{kind} {path!r} is a {type(obj).__name__}, not a callable")
    if num_positional is not None:
        try:
            sig = inspect.signature(obj)
        except (TypeError, ValueError):
            return obj  # builtins without a signature: nothing to check
        try:
            sig.bind(*([None] * num_positional))
        except TypeError as err:
            raise PluginError(
                f"{kind} {path!r} has the wrong signature {obj.__name__}{sig}: it is called with "
                f"{num_positional} positional argument(s) ({err})"
            ) from None
    return obj
