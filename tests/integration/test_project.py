"""The project's promises about itself: documentation in sync, CLI, layering, no settings changed at import."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import types

import grimp

import slime_wf_cli
from slime_wf.config import README_BEGIN, README_END, config_reference_markdown

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("slime_wf", "slime_wf_cli", "deployments", "flows", "tasks")
LINT_IMPORTS = str(pathlib.Path(sys.executable).parent / "lint-imports")
PREFECT_SETTINGS = (
    "PREFECT_HOME",
    "DO_NOT_TRACK",
    "PREFECT_SERVER_ANALYTICS_ENABLED",
    "PREFECT_LOGGING_LEVEL",
    "PREFECT_SERVER_LOGGING_LEVEL",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
)


def test_readme_documents_every_config_field():
    readme = (ROOT / "README.md").read_text()
    section = readme.split(README_BEGIN, 1)[1].split(README_END, 1)[0]
    assert section.strip() == config_reference_markdown().strip(), (
        "run `make docs` to regenerate the reference"
    )


def lint_imports(root: pathlib.Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(root))  # the packages under `root`, not the installed ones
    return subprocess.run(
        [LINT_IMPORTS, "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )


def test_import_contracts_hold():
    """`make lint`'s import contracts (pyproject.toml) on the real import graph."""
    run = lint_imports(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


def test_import_contracts_see_imports_inside_functions(tmp_path):
    """A copy of the tree with three imports hidden in function bodies breaks the three contracts
    they cross: the library importing Prefect, a cycle, the engine server importing the trainer."""
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / "slime_wf" / "redact.py", "a") as f:  # the rollout code imports redact
        f.write("\n\ndef _hidden():\n    import prefect\n    from slime_wf.rollout import engines\n")
    with open(tmp_path / "slime_wf" / "engine_server" / "sampling.py", "a") as f:
        f.write("\n\ndef _hidden():\n    from slime_wf.training import model\n")
    run = lint_imports(tmp_path)
    assert run.returncode != 0 and "1 kept, 3 broken" in run.stdout, run.stdout + run.stderr
    broken = run.stdout.split("Broken contracts", 1)[1]
    for contract in (
        "The slime_wf library never imports the command, the Prefect layers or Prefect",
        "No import cycles in slime_wf, between modules or between packages",
        "The engine server never imports the rollout side, the trainer or weight sync",
    ):
        assert contract in broken, run.stdout
    assert "slime_wf.redact -> prefect" in broken and "slime_wf.training.model" in broken


def test_no_import_cycles_between_modules():
    """Also a module and the package above it (which the sibling contract does not see): every strongly
    connected set of modules, imports inside functions included, is a single module."""
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:  # Tarjan's strongly connected components
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                component.append(stack.pop())
                if component[-1] == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph.modules)))
    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    assert cycles == []


def test_importing_the_prefect_layers_changes_no_setting():
    env = {k: v for k, v in os.environ.items() if k not in PREFECT_SETTINGS}
    code = (
        "import json, os, tasks, flows, deployments, flows.prefect_settings\n"
        f"print(json.dumps([k for k in {PREFECT_SETTINGS!r} if k in os.environ]))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == []


def test_the_cli_applies_prefect_settings_before_a_flow_runs(tmp_path, monkeypatch):
    import flows

    for key in PREFECT_SETTINGS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    seen = {}
    fake = types.ModuleType("flows.campaign")
    fake.prepare = lambda cfg: seen.update({k: os.environ.get(k) for k in PREFECT_SETTINGS}) or {}
    monkeypatch.setitem(sys.modules, "flows.campaign", fake)
    monkeypatch.setattr(flows, "campaign", fake, raising=False)
    (tmp_path / "c.yaml").write_text("rollout:\n  rollout_batch_size: 4\n")
    assert slime_wf_cli.main(["prepare", "--config", str(tmp_path / "c.yaml")]) == 0
    assert seen["PREFECT_HOME"] == os.path.join(os.getcwd(), ".prefect")
    assert seen["DO_NOT_TRACK"] == "1" and seen["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"


def test_cli_check_config(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rollout:\n  rollout_batch_size: 4\n")
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "slime_wf_cli",
            "check-config",
            "--config",
            str(cfg),
            "--set",
            "num_rollout=7",
        ],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert "rollout_batch_size: 4" in ok.stdout and "num_rollout: 7" in ok.stdout
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "slime_wf_cli",
            "check-config",
            "--config",
            str(cfg),
            "--set",
            "rollout_batchsize=3",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "did you mean 'rollout.rollout_batch_size'" in bad.stderr


def test_a_module_over_about_400_lines_says_why_at_its_top():
    """A long module states its reason in a "Size:" paragraph of its docstring, or is split."""
    import ast

    unexplained = []
    for path in sorted((ROOT / "slime_wf").rglob("*.py")):
        source = path.read_text()
        if source.count("\n") <= 420:  # "about 400"
            continue
        doc = ast.get_docstring(ast.parse(source)) or ""
        if not any(paragraph.startswith("Size: ") for paragraph in doc.split("\n\n")):
            unexplained.append(f"{path.relative_to(ROOT)} ({source.count(chr(10))} lines)")
    assert not unexplained, "modules over 400 lines without a 'Size:' paragraph at the top: " + ", ".join(
        unexplained
    )


def test_the_readme_module_table_names_every_room():
    """Every package and top-level module of slime_wf appears in the README's module table and in
    ARCHITECTURE.md, so the maps stay true to the tree."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## What is here") :]
    table = table[: table.index("\n## ")]
    architecture = (ROOT / "ARCHITECTURE.md").read_text()
    missing = []
    for path in sorted((ROOT / "slime_wf").iterdir()):
        if path.name.startswith("_") or path.name == "__pycache__":
            continue
        if not (path.suffix == ".py" or (path / "__init__.py").exists()):
            continue
        name = path.name + ("/" if path.is_dir() else "")
        if f"slime_wf/{name}" not in table:
            missing.append(f"README module table: slime_wf/{name}")
        if f"`{name}`" not in architecture:
            missing.append(f"ARCHITECTURE.md: `{name}`")
    assert not missing, "rooms missing from the maps: " + "; ".join(missing)
