"""The campaign's metric names: one scheme, no duplicates, zero counters left out, the README in step."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from slime_wf.metrics import (
    METRICS,
    PREFIXES,
    README_BEGIN,
    README_END,
    describe,
    metrics_markdown,
    numeric,
    summary_line,
    tidy,
    train_metrics,
)

README = Path(__file__).resolve().parents[2] / "README.md"

# what Trainer.train returns for one id (slime_wf.training.train_step.train_rollout), abridged
RAW = {
    "loss": -0.25,
    "pg_loss": -0.25,
    "entropy": 0.5,
    "pg_clipfrac": 0.0,
    "pg_dual_clipfrac": 0.0,
    "ppo_kl": 0.0,
    "train_rollout_logprob_abs_diff": 0.01,
    "train_rollout_kl": 0.002,
    "grad_norm": 1.5,
    "lr": 1e-3,
    "update_skipped": 0.0,
    "step_time_s": 0.3,
    "tokens": 100.0,
    "samples": 8.0,
    "num_steps": 1.0,
    "applied_steps": 1.0,
    "skipped_steps": 0.0,
    "consecutive_skipped_steps": 0.0,
    "tokens_per_s": 333.0,
    "train_time_s": 0.3,
    "score_time_s": 0.05,
    "rollout_train_time_s": 0.35,
    "padding_fraction": 0.1,
    "mean_reward": 0.5,
    "rollout_id": 3,
    "step": 4,
    "steps": [{"loss": -0.25}],
}


def test_readme_metrics_table_is_the_generated_one():
    text = README.read_text(encoding="utf-8")
    block = text.split(README_BEGIN, 1)[1].split(README_END, 1)[0]
    assert block.strip() == metrics_markdown().strip(), "run `make docs`"


def test_every_documented_name_uses_a_prefix_of_the_scheme_once():
    names = [m.name for m in METRICS]
    assert len(names) == len(set(names))
    assert all(n.startswith(PREFIXES) for n in names)
    assert all(m.meaning.endswith(".") for m in METRICS)


@pytest.mark.parametrize(
    "name, documented",
    [
        ("eval/gsm8k/reward", "eval/<set>/reward"),
        ("eval/gsm8k/response_len/mean", "eval/<set>/response_len/mean"),
        ("filter/drop_zero_std_0", "filter/drop_<reason>"),
        ("filter/drop_fraction", "filter/drop_fraction"),  # an exact name wins over the pattern
        ("train/critic/value_loss", "train/critic/value_loss"),
        ("train/my_custom_term", "train/<key>"),
        ("rm/timeouts", "rm/timeouts"),
    ],
)
def test_names_resolve_to_their_documentation(name, documented):
    entry = describe(name)
    assert entry is not None and entry.name == documented


def test_undocumented_names_are_not_resolved():
    assert (
        describe("loss") is None
        and describe("rollout/rm/samples") is None
        and describe("eval/a/b/reward") is None
    )


def test_train_metrics_are_renamed_and_duplicates_dropped():
    args = SimpleNamespace(entropy_coef=0.0, eps_clip_c=None)
    out = train_metrics(RAW, args)
    assert out == {
        "train/loss": -0.25,
        "train/entropy": 0.5,
        "train/pg_clipfrac": 0.0,
        "train/ppo_kl": 0.0,
        "train/rollout_logprob_abs_diff": 0.01,
        "train/rollout_kl": 0.002,
        "train/grad_norm": 1.5,
        "train/lr": 1e-3,
        "train/tokens": 100.0,
        "train/tokens_per_s": 333.0,
        "train/padding_fraction": 0.1,
        "train/optimizer_step": 4.0,
        "train/skipped_steps": 0.0,
        "time/train_logprob_s": 0.05,
    }
    assert all(describe(name) is not None for name in out)


def test_pg_loss_and_dual_clipfrac_stay_when_they_say_something():
    with_terms = train_metrics(
        {**RAW, "kl_loss": 0.1, "critic/value_loss": 2.0, "my_term": 1.0},
        SimpleNamespace(entropy_coef=0.0, eps_clip_c=3.0),
    )
    assert with_terms["train/pg_loss"] == -0.25 and with_terms["train/kl_loss"] == 0.1
    assert with_terms["train/pg_dual_clipfrac"] == 0.0
    assert with_terms["train/critic/value_loss"] == 2.0 and with_terms["train/my_term"] == 1.0
    assert "train/pg_loss" in train_metrics(RAW, SimpleNamespace(entropy_coef=0.01, eps_clip_c=None))


def test_tidy_leaves_out_zero_counters_only():
    metrics = {"rm/timeouts": 0.0, "rm/errors": 2.0, "rm/samples": 0.0, "filter/drop_surplus": 0.0, "x": 0}
    assert tidy(metrics) == {"rm/errors": 2.0, "rm/samples": 0.0, "x": 0}


def test_numeric_keeps_every_number_but_the_step():
    assert numeric({"rollout_id": 3, "train/loss": float("nan"), "note": "text", "flag": True, "n": 2}) == {
        "train/loss": pytest.approx(float("nan"), nan_ok=True),
        "n": 2.0,
    }
    assert math.isnan(numeric({"a": float("nan")})["a"])


def test_summary_line_names_the_key_numbers():
    line = summary_line(
        7,
        {
            "rollout/raw_reward": 0.4321,
            "eval/gsm8k/reward": 0.5,
            "train/loss": -0.01234,
            "train/rollout_kl": 0.002,
            "train/grad_norm": 1.25,
            "filter/drop_fraction": 0.25,
            "time/rollout_s": 1.0,
            "time/train_s": 2.5,
            "time/train_logprob_s": 0.5,  # a part of time/train_s
        },
    )
    assert line == (
        "rollout 7: reward 0.432, eval gsm8k 0.500, loss -0.01234, kl 0.002, grad_norm 1.25, dropped 25%, 3.5s"
    )
    assert summary_line(0, {}).startswith("rollout 0: reward -, loss -")
