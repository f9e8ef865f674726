"""The project's promises about itself: documentation in sync, CLI, layering."""

import pathlib
import subprocess
import sys

from slime_wf.config import README_BEGIN, README_END, config_reference_markdown

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_documents_every_config_field():
    readme = (ROOT / "README.md").read_text()
    section = readme.split(README_BEGIN, 1)[1].split(README_END, 1)[0]
    assert section.strip() == config_reference_markdown().strip(), "run `make docs` to regenerate the reference"


def test_library_never_imports_prefect():
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "slime_wf").rglob("*.py")
        if any(line.startswith(("import prefect", "from prefect")) for line in p.read_text().splitlines())
    ]
    assert offenders == []


def test_cli_check_config(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rollout:\n  rollout_batch_size: 4\n")
    ok = subprocess.run(
        [sys.executable, "-m", "slime_wf.cli", "check-config", "--config", str(cfg), "--set", "num_rollout=7"],
        capture_output=True, text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert "rollout_batch_size: 4" in ok.stdout and "num_rollout: 7" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "slime_wf.cli", "check-config", "--config", str(cfg), "--set", "rollout_batchsize=3"],
        capture_output=True, text=True,
    )
    assert bad.returncode == 2 and "did you mean 'rollout.rollout_batch_size'" in bad.stderr
