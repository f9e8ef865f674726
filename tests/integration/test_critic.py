"""PPO's critic through the Megatron path: the value head, GAE from its values, the value loss
it learns from, critic-only warm-up, its checkpoint, and PPO raising a tiny policy's reward."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.megatron_helpers import assert_unchanged_and_finite, make_hf_checkpoint, snapshot
from helpers.tiny_models import make_tiny_model
from helpers.trainer_samples import BASE, logits_of, random_samples, sample_rollout, train_save_and_go_on

from slime_wf.training import train_step
from slime_wf.training.batching import items_from_samples, pad_micro_batch
from slime_wf.training.critic import CRITIC_DIR, critic_source
from slime_wf.training.model import forward_logits
from slime_wf.training.train_step import score_values
from slime_wf.training.trainer import Trainer

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning:megatron.*",
    "ignore::FutureWarning:torch.*",
    "ignore::FutureWarning:megatron.*",
)

PPO = {**BASE, "advantage_estimator": "ppo", "gamma": 1.0, "lambd": 0.95, "micro_batch_size": 4}


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen3-critic"), arch="qwen3", seed=0)


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("tiny-qwen3-tied"), "qwen3", tied=True, seed=1)


def _values(trainer, samples):
    items = items_from_samples(samples, trainer.args)
    score_values(trainer.critic.model, [pad_micro_batch(items)])
    return [it.per_token["values"] for it in items]


def test_only_ppo_builds_a_critic(untied_dir):
    trainer = Trainer(BASE, untied_dir)
    try:
        assert trainer.critic is None
    finally:
        trainer.shutdown()


@pytest.mark.parametrize("which", ["untied", "tied"])
def test_critic_has_the_policy_body_and_a_zero_value_head(which, untied_dir, tied_dir):
    """The body comes from the HF checkpoint (tied embeddings too): the critic's final hidden
    states are the policy's; the head maps them to one value per position, zero at first."""
    trainer = Trainer(PPO, untied_dir if which == "untied" else tied_dir)
    try:
        critic, actor = trainer.critic.model, trainer.actor
        actor_body = {k: v for k, v in actor.named_parameters() if not k.startswith("output_layer")}
        critic_body = {k: v for k, v in critic.named_parameters() if not k.startswith("output_layer")}
        assert actor_body.keys() == critic_body.keys()
        assert all(torch.equal(actor_body[k], critic_body[k]) for k in actor_body)
        samples = random_samples(4, seed=1)
        mb = pad_micro_batch(items_from_samples(samples, trainer.args))
        with torch.no_grad():
            values = forward_logits(critic, mb.input_ids, mb.attention_mask, mb.position_ids)
        assert values.shape == (*mb.input_ids.shape, 1) and torch.count_nonzero(values) == 0
        # a head that reads the hidden state: give it weight and the values are h . w
        with torch.no_grad():
            critic.output_layer.weight.normal_()
        per_token = _values(trainer, samples)
        assert [v.numel() for v in per_token] == [s.response_length for s in samples]
        assert all(v.abs().sum() > 0 for v in per_token)
    finally:
        trainer.shutdown()


def test_ppo_step_uses_gae_and_the_critic_learns_the_returns(untied_dir):
    """Training on the same rollout again and again: the value loss falls (the critic fits the
    returns), the critic's values of the last token approach the rewards (gamma=1, one reward at
    the end), and the policy gets a PPO step every time."""
    samples = random_samples(8, seed=7)
    trainer = Trainer({**PPO, "critic_lr": 2e-3, "num_rollout": 40}, untied_dir)
    try:
        first = trainer.train(samples, 0)
        assert first["critic/value_loss"] > 0 and first["critic/grad_norm"] > 0
        assert first["critic/lr"] == pytest.approx(2e-3) and first["lr"] == pytest.approx(1e-3)
        assert math.isfinite(first["pg_loss"]) and first["grad_norm"] > 0
        losses = [first["critic/value_loss"]]
        for rollout_id in range(1, 30):
            losses.append(trainer.train(samples, rollout_id)["critic/value_loss"])
        assert losses[-1] < 0.2 * losses[0], losses
        last = torch.tensor([v[-1].item() for v in _values(trainer, samples)])
        rewards = torch.tensor([s.reward for s in samples])
        assert (last - rewards).abs().mean() < 0.5 * (rewards - rewards.mean()).abs().mean() + 0.05
    finally:
        trainer.shutdown()


def test_critic_only_steps_leave_the_policy_alone(untied_dir):
    samples = random_samples(8, seed=8)
    trainer = Trainer({**PPO, "num_critic_only_steps": 1}, untied_dir)
    try:
        before = logits_of(trainer, samples)
        warm = trainer.train(samples, 0)
        assert "pg_loss" not in warm and warm["critic/value_loss"] > 0 and trainer.step == 0
        assert torch.equal(logits_of(trainer, samples), before)
        trained = trainer.train(samples, 1)
        assert "pg_loss" in trained and trainer.step == 1
        assert not torch.equal(logits_of(trainer, samples), before)
    finally:
        trainer.shutdown()


def test_critic_checkpoint_resumes_exactly(untied_dir, tmp_path):
    rollouts = [random_samples(8, seed=20 + k) for k in range(3)]
    settings = {**PPO, "num_steps_per_rollout": 2, "critic_lr": 5e-3}
    values_at_save, expected, _ = train_save_and_go_on(
        Trainer(settings, untied_dir),
        rollouts,
        tmp_path / "ckpts" / "000001",
        lambda t: _values(t, rollouts[2]),
    )
    assert (tmp_path / "ckpts" / "000001" / CRITIC_DIR / "trainer_state.json").is_file()

    trainer = Trainer({**settings, "load": str(tmp_path / "ckpts")}, untied_dir)
    try:
        assert trainer.critic.step == 4
        assert all(
            torch.equal(a, b) for a, b in zip(_values(trainer, rollouts[2]), values_at_save, strict=True)
        )
        resumed = trainer.train(rollouts[2], 2)
        for key in ("critic/value_loss", "critic/grad_norm", "critic/lr", "pg_loss", "grad_norm"):
            assert resumed[key] == expected[key], key
    finally:
        trainer.shutdown()

    # critic_load starts a new campaign's critic from that checkpoint (the policy from HF)
    trainer = Trainer({**settings, "critic_load": str(tmp_path / "ckpts")}, untied_dir)
    try:
        assert trainer.step == 0 and trainer.critic.step == 4
        assert all(
            torch.equal(a, b) for a, b in zip(_values(trainer, rollouts[2]), values_at_save, strict=True)
        )
    finally:
        trainer.shutdown()
    assert (
        critic_source(tmp_path / "ckpts" / "000001" / CRITIC_DIR)
        == tmp_path / "ckpts" / "000001" / CRITIC_DIR
    )
    with pytest.raises(FileNotFoundError, match="holds no critic checkpoint"):
        critic_source(tmp_path / "nothing-here")


def test_non_finite_values_skip_the_critic_update(untied_dir, monkeypatch):
    """A NaN reward skips the critic's and the policy's updates; a non-finite value loss alone
    skips the critic's: its weights, Adam state, step and schedule stay as they were."""
    trainer = Trainer(PPO, untied_dir)
    try:
        trainer.train(random_samples(8, seed=40), 0)
        critic = trainer.critic
        critic_before, actor_before = (
            snapshot(critic.ddp_model, critic.optimizer),
            snapshot(trainer.ddp_model, trainer.optimizer),
        )
        schedule = (critic.scheduler.num_steps, trainer.scheduler.num_steps)
        bad = random_samples(8, seed=41)
        bad[3].reward = float("inf")
        metrics = trainer.train(bad, 1)
        assert (metrics["steps"][0]["critic/update_skipped"], metrics["steps"][0]["update_skipped"]) == (
            1.0,
            1.0,
        )
        assert_unchanged_and_finite(critic_before, snapshot(critic.ddp_model, critic.optimizer))
        assert_unchanged_and_finite(actor_before, snapshot(trainer.ddp_model, trainer.optimizer))
        assert (critic.step, trainer.step) == (1, 1)
        assert (critic.scheduler.num_steps, trainer.scheduler.num_steps) == schedule

        original = train_step.loss_function

        def nan_value_loss(args, batch, logits, **kwargs):
            loss, metrics = original(args, batch, logits, **kwargs)
            return (loss * float("nan"), metrics) if args.loss_type == "value_loss" else (loss, metrics)

        monkeypatch.setattr(train_step, "loss_function", nan_value_loss)
        metrics = trainer.train(random_samples(8, seed=42), 2)
        step = metrics["steps"][0]
        assert (step["critic/update_skipped"], step["update_skipped"]) == (1.0, 0.0)
        assert not math.isfinite(step["critic/grad_norm"]) and math.isfinite(step["grad_norm"])
        assert_unchanged_and_finite(critic_before, snapshot(critic.ddp_model, critic.optimizer))
        assert (critic.step, trainer.step) == (1, 2) and critic.scheduler.num_steps == schedule[0]
        assert (metrics["skipped_steps"], metrics["consecutive_skipped_steps"]) == (1, 2)
    finally:
        trainer.shutdown()


@pytest.mark.slow
def test_ppo_raises_the_reward_of_a_tiny_policy(untied_dir):
    """PPO with GAE over the critic's values pushes up the share of tokens whose id is a multiple
    of 4 (the same toy reward as the GRPO test), after one critic-only rollout."""

    def reward(response):
        return sum(t % 4 == 0 for t in response) / len(response)

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    trainer = Trainer(
        {
            **PPO,
            "rollout_batch_size": 4,
            "n_samples_per_prompt": 8,
            "num_rollout": 12,
            "num_steps_per_rollout": 2,
            "micro_batch_size": 8,
            "lr": 5e-3,
            "critic_lr": 5e-3,
            "normalize_advantages": True,
            "num_critic_only_steps": 1,
        },
        untied_dir,
    )
    try:
        rewards = []
        for rollout_id in range(12):
            samples = sample_rollout(
                trainer, gen, prompts=4, n=8, prompt_len=4, response_len=8, reward_fn=reward
            )
            metrics = trainer.train(samples, rollout_id)
            rewards.append(metrics["mean_reward"])
            assert math.isfinite(metrics["critic/value_loss"])
    finally:
        trainer.shutdown()
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.2, rewards  # 11 policy updates (GRPO's test: 12, and +0.3)


@pytest.mark.slow
def test_ppo_under_torchrun_tp2_matches_tp1_and_its_critic_loads_at_tp1(untied_dir, tmp_path):
    """The value head is replicated over the tensor-parallel ranks: PPO at TP=2 (torchrun, two
    ranks) gives the TP=1 losses and gradient norms, and its critic checkpoint loads at TP=1."""
    from slime_wf.training.service import RemoteTrainer

    settings = {**PPO, "num_steps_per_rollout": 2, "micro_batch_size": 2, "critic_lr": 5e-3, "adam_eps": 1e-4}
    rollouts = [random_samples(8, seed=60 + k) for k in range(2)]
    local = Trainer(settings, untied_dir)
    try:
        expected = [local.train(rollouts[k], k) for k in range(2)]
        values = _values(local, rollouts[0])
    finally:
        local.shutdown()
    with RemoteTrainer(
        {**settings, "tensor_model_parallel_size": 2},
        untied_dir,
        nproc_per_node=2,
        work_dir=tmp_path / "service",
        threads_per_rank=1,
        startup_timeout=240,
        command_timeout=240,
    ) as remote:
        got = [remote.train(rollouts[k], k) for k in range(2)]
        remote.save(tmp_path / "ckpts" / "000001", 1)
    for want, have in zip(expected, got, strict=True):
        for want_step, have_step in zip(want["steps"], have["steps"], strict=True):
            for key in ("pg_loss", "critic/value_loss", "critic/value_clipfrac"):
                assert have_step[key] == pytest.approx(want_step[key], abs=1e-5), key
            for key in ("grad_norm", "critic/grad_norm"):
                assert have_step[key] == pytest.approx(want_step[key], rel=1e-4), key
    assert got[1]["steps"][1]["critic/grad_norm"] > 0.01
    trainer = Trainer({**settings, "load": str(tmp_path / "ckpts")}, untied_dir)
    try:
        assert trainer.critic.step == 4
        for a, b in zip(_values(trainer, rollouts[0]), values, strict=True):
            assert torch.allclose(a, b, atol=1e-4)
    finally:
        trainer.shutdown()
