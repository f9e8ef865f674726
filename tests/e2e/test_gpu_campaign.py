"""The GPU campaign (benchmarks/gpu_campaign.py): SGLang engines, a TP=2 trainer, distributed sync.

Runs only where CUDA, SGLang and enough GPUs are present; elsewhere it is skipped with the reason
the script gives."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_campaign.py"


def _script():
    spec = importlib.util.spec_from_file_location("gpu_campaign", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_says_why_it_cannot_run_here():
    script = _script()
    why = script.missing(2, 1, sys.executable)
    if why is None:
        pytest.skip("this machine can run the GPU campaign (see test_gpu_campaign_runs_to_its_end)")
    assert script.main(["--num-rollout", "2"]) == 0  # says so and exits 0: nothing to run here


@pytest.mark.slow
def test_gpu_campaign_runs_to_its_end(tmp_path, capsys):
    script = _script()
    why = script.missing(2, 1, sys.executable)
    if why is not None:
        pytest.skip(f"GPU campaign not runnable here: {why}")
    assert script.main(["--num-rollout", "3", "--store", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "ledger invariant holds" in out and "| sync |" in out
