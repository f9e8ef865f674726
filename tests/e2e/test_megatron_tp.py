"""Tensor parallelism on CPU: torchrun with 2 processes (gloo) against TP=1 in this process.

The worker (tests/helpers/megatron_tp_worker.py) records logits, an HF export, losses of a few
optimizer steps and a checkpoint at TP=2; this process repeats the work at TP=1 and loads the
TP=2 checkpoint. `slime-wf hf-parity --tp 2` runs the CLI path (torchrun relaunch) end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import megatron_tp_worker as worker
from helpers.megatron_helpers import make_hf_checkpoint

from slime_wf.training.checkpointing import load_checkpoint
from slime_wf.training.model import build_gpt_model, forward_logits
from slime_wf.training.optimizer import build_optimizer
from slime_wf.training.parallel import destroy_parallel, init_parallel
from slime_wf.training.weights import load_hf_checkpoint_into, megatron_to_hf

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_tp2_matches_tp1(tmp_path):
    # Qwen2 with tied embeddings: q/k/v biases split by query group, a vocab-parallel shared embedding.
    hf_dir = make_hf_checkpoint(tmp_path / "hf", "qwen2", tied=True, seed=3)
    out = tmp_path / "tp2"
    out.mkdir()
    proc = _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            str(ROOT / "tests" / "helpers" / "megatron_tp_worker.py"),
            "--hf-dir",
            str(hf_dir),
            "--out",
            str(out),
        ],
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    tp2 = torch.load(out / "results.pt", weights_only=False)
    assert tp2["tp"] == 2
    assert (
        tp2["export_mismatched"] == [] and tp2["export_count"] == 2 * 12 + 2
    )  # bit-exact HF export (12 per layer with biases)

    init_parallel(1, seed=0)
    try:
        model = build_gpt_model(hf_dir)
        load_hf_checkpoint_into(model, hf_dir)
        input_ids, mask = worker.batch(model.hf_arch.vocab_size)
        with torch.no_grad():
            logits = forward_logits(model, input_ids, mask)
        assert (logits - tp2["logits"]).abs().max() < _fp32_rounding(logits)
        ddp_model, optimizer = build_optimizer(model, lr=worker.LR, clip_grad=1.0)
        losses = [
            worker.train_step(ddp_model, optimizer, input_ids, mask) for _ in range(worker.STEPS_BEFORE_SAVE)
        ]
        assert losses[-1] < losses[0] - 0.1  # the steps do train
        assert max(abs(a - b) for a, b in zip(losses, tp2["losses"], strict=True)) < LOSS_ROUNDING
    finally:
        destroy_parallel()

    # The TP=2 checkpoint (model and optimizer) at TP=1.
    init_parallel(1, seed=99)
    try:
        model = build_gpt_model(hf_dir)
        ddp_model, optimizer = build_optimizer(model, lr=worker.LR, clip_grad=1.0)
        state = load_checkpoint(out / "ckpt", ddp_model, optimizer)
        assert state["step"] == worker.STEPS_BEFORE_SAVE and state["extra"] == {"tp": 2}
        assert not state["rng_restored"]  # saved by two ranks: streams do not carry over
        weights = megatron_to_hf(model)
        assert set(weights) == set(tp2["weights_at_save"])
        assert all(torch.equal(weights[k], tp2["weights_at_save"][k]) for k in weights)
        with torch.no_grad():
            at_save = forward_logits(model, input_ids, mask)
            assert (at_save - tp2["logits_at_save"]).abs().max() < _fp32_rounding(at_save)
        # Adam moments resharded too: the next step matches the TP=2 run's next step.
        assert (
            abs(worker.train_step(ddp_model, optimizer, input_ids, mask) - tp2["loss_after_save"])
            < LOSS_ROUNDING
        )
    finally:
        destroy_parallel()


# Adam at lr 1e-2 turns float32 rounding of near-zero gradients into updates of lr size, so the
# losses of a few steps at TP=1 and TP=2 differ by a few 1e-5; a sharding fault differs by 1e-3 and more.
LOSS_ROUNDING = 5e-5


def _fp32_rounding(logits: torch.Tensor) -> torch.Tensor:
    """What float32 rounding alone moves logits by between TP sizes: the row-parallel sums and the fused
    attention kernel add in other orders, about ten ulps of the largest logit; a sharding fault moves
    them by far more."""
    return 32 * torch.finfo(torch.float32).eps * logits.abs().max()


def test_hf_parity_cli_tp2(tmp_path):
    # Qwen3 untied: q/k norms, head_dim != hidden/heads, a vocab-parallel output layer.
    hf_dir = make_hf_checkpoint(tmp_path / "hf", "qwen3", tied=False, seed=4)
    export = tmp_path / "export"
    proc = _run(
        [
            sys.executable,
            "-m",
            "slime_wf_cli",
            "hf-parity",
            "--hf-checkpoint",
            str(hf_dir),
            "--tp",
            "2",
            "--export-dir",
            str(export),
        ],
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["tp"] == 2 and report["model_type"] == "qwen3"
    # padding: float32 rounding only (see _fp32_rounding; these logits reach about 10)
    assert report["max_abs_logit_diff"] < 1e-4 and report["max_abs_pad_diff"] < 4e-5
    assert report["roundtrip_exact"], report["roundtrip_mismatched"]
    assert (export / "model.safetensors").is_file() and (export / "config.json").is_file()
