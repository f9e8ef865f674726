"""Non-finite values never reach the weights: a step whose inputs, loss or gradient norm are not
finite is skipped (no update, no schedule step), counted, and enough skips in a row stop training
with NonFiniteTrainingError, a count that survives a restart from a checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.megatron_helpers import assert_unchanged_and_finite, snapshot
from helpers.tiny_models import make_tiny_model
from helpers.trainer_samples import BASE, random_samples

from slime_wf.training.nonfinite import NonFiniteTrainingError
from slime_wf.training.objectives import policy_loss_function
from slime_wf.training.trainer import Trainer

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning:megatron.*",
    "ignore::FutureWarning:torch.*",
    "ignore::FutureWarning:megatron.*",
)

NAN = float("nan")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"), arch="qwen3", seed=0)


_BROKEN = {"mode": None}


def broken_loss(args, batch, logits, sum_of_sample_mean):
    """The policy loss, made non-finite on demand: `nan_loss` (NaN loss, NaN gradients) or
    `inf_grad` (a finite loss whose gradient is infinite: d sqrt(u)/du at u = 0)."""
    loss, metrics = policy_loss_function(args, batch, logits, sum_of_sample_mean)
    if _BROKEN["mode"] == "nan_loss":
        loss = loss * NAN
    elif _BROKEN["mode"] == "inf_grad":
        x = logits.reshape(-1)[0]
        loss = loss + 1e-30 * torch.sqrt(x - x.detach())
    return loss, metrics


def _poison(samples, indices, field):
    for i in indices:
        if field == "reward":
            samples[i].reward = NAN
        else:
            samples[i].rollout_log_probs = [NAN] + samples[i].rollout_log_probs[1:]
    return samples


@pytest.mark.parametrize(("field", "settings"), [("reward", {}), ("rollout_log_probs", {"use_tis": True})])
def test_a_non_finite_input_skips_the_step_and_leaves_weights_and_adam_bit_identical(
    tiny_dir, field, settings
):
    trainer = Trainer({**BASE, **settings, "lr": 1e-2}, tiny_dir)
    try:
        trainer.train(random_samples(8, seed=20), 0)  # Adam has state now
        before = snapshot(trainer.ddp_model, trainer.optimizer)
        lr_steps = trainer.scheduler.num_steps
        metrics = trainer.train(_poison(random_samples(8, seed=21), [5], field), 1)
        assert_unchanged_and_finite(before, snapshot(trainer.ddp_model, trainer.optimizer))
        assert trainer.scheduler.num_steps == lr_steps and trainer.step == 1
        assert (metrics["skipped_steps"], metrics["applied_steps"], metrics["consecutive_skipped_steps"]) == (
            1,
            0,
            1,
        )
        assert metrics["steps"][0]["update_skipped"] == 1.0 and metrics["steps"][0]["skipped"] == 1.0
        # the next clean rollout trains, from the schedule where it stood, and resets the count
        metrics = trainer.train(random_samples(8, seed=22), 2)
        assert metrics["applied_steps"] == 1 and metrics["consecutive_skipped_steps"] == 0
        assert trainer.scheduler.num_steps == lr_steps + 1 and trainer.step == 2
    finally:
        trainer.shutdown()


def test_engine_log_probs_the_loss_does_not_read_do_not_skip(tiny_dir):
    trainer = Trainer({**BASE, "lr": 1e-2}, tiny_dir)
    try:
        before = snapshot(trainer.ddp_model, trainer.optimizer)
        metrics = trainer.train(_poison(random_samples(8, seed=23), [2], "rollout_log_probs"), 0)
        assert metrics["skipped_steps"] == 0 and math.isfinite(metrics["loss"])
        after = snapshot(trainer.ddp_model, trainer.optimizer)
        assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
        assert any(not torch.equal(before[k], after[k]) for k in before if k in after)
    finally:
        trainer.shutdown()


BROKEN_SETTINGS = {
    **BASE,
    "lr": 1e-2,
    "global_batch_size": 4,
    "loss_type": "custom_loss",
    "custom_loss_function_path": f"{__name__}.broken_loss",
}


@pytest.fixture(scope="module")
def without_the_broken_rollout(tiny_dir):
    """Rollout 2's step metrics when rollout 1 never happened."""
    trainer = Trainer(BROKEN_SETTINGS, tiny_dir)
    try:
        trainer.train(random_samples(8, seed=24), 0)
        return trainer.train(random_samples(8, seed=26), 2)["steps"]
    finally:
        trainer.shutdown()


@pytest.mark.parametrize("mode", ["nan_loss", "inf_grad"])
def test_a_non_finite_loss_or_gradient_norm_skips_the_update(tiny_dir, mode, without_the_broken_rollout):
    trainer = Trainer(BROKEN_SETTINGS, tiny_dir)
    try:
        trainer.train(random_samples(8, seed=24), 0)
        before = snapshot(trainer.ddp_model, trainer.optimizer)
        lr_steps = trainer.scheduler.num_steps
        _BROKEN["mode"] = mode
        metrics = trainer.train(random_samples(8, seed=25), 1)
        _BROKEN["mode"] = None
        assert_unchanged_and_finite(before, snapshot(trainer.ddp_model, trainer.optimizer))
        assert trainer.scheduler.num_steps == lr_steps and trainer.step == 2
        assert [s["update_skipped"] for s in metrics["steps"]] == [1.0, 1.0]
        assert not any(math.isfinite(s["grad_norm"]) for s in metrics["steps"])
        if mode == "inf_grad":
            assert all(math.isfinite(s["loss"]) for s in metrics["steps"])
        # no trace is left (gradients, Adam's moments and step count, the schedule): the next rollout
        # trains exactly as if the broken one had never happened
        after = trainer.train(random_samples(8, seed=26), 2)
        assert after["applied_steps"] == 2
        for got, want in zip(after["steps"], without_the_broken_rollout, strict=True):
            assert (got["loss"], got["grad_norm"], got["lr"]) == (want["loss"], want["grad_norm"], want["lr"])
    finally:
        _BROKEN["mode"] = None
        trainer.shutdown()


def test_consecutive_skips_stop_training_and_the_count_survives_a_restart(tiny_dir, tmp_path):
    settings = {**BASE, "global_batch_size": 4, "max_consecutive_skipped_steps": 3}  # groups 0 | 1 per step

    def rollout(seed, bad_groups):
        return _poison(random_samples(8, seed=seed), [4 * g + 1 for g in bad_groups], "reward")

    trainer = Trainer(settings, tiny_dir)
    try:
        first = trainer.train(rollout(30, [1]), 0)
        assert [s["skipped"] for s in first["steps"]] == [0.0, 1.0] and first[
            "consecutive_skipped_steps"
        ] == 1
        second = trainer.train(rollout(31, [0]), 1)  # skip (2 in a row), then a good step resets the count
        assert [s["skipped"] for s in second["steps"]] == [1.0, 0.0] and second[
            "consecutive_skipped_steps"
        ] == 0
        third = trainer.train(rollout(32, [0, 1]), 2)
        assert third["consecutive_skipped_steps"] == 2 and third["skipped_steps"] == 2
        trainer.save(tmp_path / "ckpt", rollout_id=2)
    finally:
        trainer.shutdown()

    trainer = Trainer({**settings, "load": str(tmp_path / "ckpt")}, tiny_dir)
    try:
        assert trainer.consecutive_skipped_steps == 2 and trainer.step == 2
        with pytest.raises(NonFiniteTrainingError) as caught:
            trainer.train(rollout(33, [0]), 3)
    finally:
        trainer.shutdown()
    err = caught.value
    assert (err.rollout_id, err.consecutive, err.applied_steps, len(err.skips)) == (3, 3, 0, 1)
    message = str(err)
    for part in (
        "rollout 3",
        "3 optimizer steps in a row",
        "max_consecutive_skipped_steps=3",
        "step 1/2: non-finite inputs:",
        "sample 1 (group 0): reward nan, advantages",
        "the 2 before them, in earlier rollouts",
        "lower train.lr",
        "resume from the committed checkpoint",
    ):
        assert part in message, (part, message)
