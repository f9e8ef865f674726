"""The Megatron trainer in this process (TP=1): settings, batching, the train step, a GRPO
learning run, the reference model, checkpoint resume and HF export."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.tiny_models import make_tiny_model
from helpers.trainer_samples import BASE, logits_of, random_samples, sample_rollout, train_save_and_go_on

from slime_wf.config import CampaignConfig, ConfigError
from slime_wf.training import train_step
from slime_wf.training.batching import (
    items_from_samples,
    make_micro_batches,
    pad_micro_batch,
    shard_for_data_parallel,
    split_steps,
)
from slime_wf.training.model import forward_logits
from slime_wf.training.objectives import ObjectiveOptions
from slime_wf.training.train_args import resolve_train_args
from slime_wf.training.trainer import Trainer
from slime_wf.types import Sample

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning:megatron.*",
    "ignore::FutureWarning:torch.*",
    "ignore::FutureWarning:megatron.*",
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"), arch="qwen3", seed=0)


def test_campaign_args_carry_the_trainer_defaults():
    args = CampaignConfig().args()
    assert (args.lr, args.micro_batch_size, args.save_interval, args.params_dtype) == (1e-6, 1, 1, "auto")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"train": {"micro_batch_size": 3}}, "micro_batch_size=3 does not divide the global batch size 8"),
        ({"train": {"global_batch_size": 3}}, "global_batch_size=3 does not divide rollout_batch_size x"),
        ({"train": {"num_steps_per_rollout": 3}}, "num_steps_per_rollout=3 does not divide"),
        ({"train": {"global_batch_size": 4, "num_steps_per_rollout": 4}}, "set one of them to null"),
        ({"train": {"min_lr": 1.0}}, "min_lr=1.0 is above train.lr"),
        ({"train": {"lr_decay_style": "cosine", "lr_warmup_iters": 5}}, "lr_warmup_iters=5 must be below"),
        ({"train": {"loss_type": "value_loss"}}, "the value loss is the critic's"),
        ({"train": {"num_critic_only_steps": 2}}, "num_critic_only_steps=2 needs advantage_estimator: ppo"),
        ({"train": {"advantage_estimator": "reinforce_plus_plus"}}, "requires normalize_advantages: true"),
        ({"train": {"loss_type": "custom_loss"}}, "custom_loss_function_path"),
        ({"train": {"kl_loss_type": "k4"}}, "train.kl_loss_type = 'k4'"),
        ({"train": {"params_dtype": "float16"}}, "train.params_dtype = 'float16'"),
        ({"checkpoint": {"save_interval": 0}}, "checkpoint.save_interval = 0"),
    ],
)
def test_train_settings_are_checked(settings, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        CampaignConfig.from_dict(
            {"rollout": {"rollout_batch_size": 2, "n_samples_per_prompt": 4, "num_rollout": 4}, **settings}
        )


def test_resolve_train_args_derives_the_nulls():
    args = resolve_train_args(BASE, global_batch_size=4, lr_decay_style="cosine", custom_flag="kept")
    assert (args.global_batch_size, args.num_steps_per_rollout, args.lr_decay_iters) == (4, 2, 8)
    assert args.eps_clip_high == args.eps_clip and args.custom_flag == "kept" and args.reward_key is None
    assert resolve_train_args(BASE).num_steps_per_rollout == 1
    with pytest.raises(ConfigError, match="(?s)trainer settings: .*micro_batch_size=3"):
        resolve_train_args(BASE, micro_batch_size=3)


# ---- batching ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"response_length": 0, "tokens": []}, "response_length=0 with 0 tokens"),
        ({"response_length": 5, "tokens": [1, 2, 3, 4, 5]}, "at least one token"),
        ({"loss_mask": [1]}, "loss_mask has 1 entries but response_length is 2"),
        ({"reward": None}, "reward None is not a number"),
        ({"reward": {"score": 1.0}}, "set reward_key"),
        ({"rollout_log_probs": [0.0]}, "rollout_log_probs has 1 entries"),
    ],
)
def test_items_from_samples_rejects_bad_samples(change, message):
    sample = Sample(index=7, tokens=[5, 6, 7, 8], response_length=2, reward=1.0)
    for key, value in change.items():
        setattr(sample, key, value)
    with pytest.raises((ValueError, KeyError), match=message):
        items_from_samples([sample], resolve_train_args(BASE))


def test_items_from_samples_reads_rewards_and_masks():
    args = resolve_train_args(BASE, reward_key="score")
    removed = Sample(index=0, tokens=[1, 2, 3], response_length=2, reward={"score": 0.5}, remove_sample=True)
    kept = Sample(index=1, tokens=[1, 2, 3, 4], response_length=3, reward={"score": 2}, loss_mask=[1, 0, 1])
    items = items_from_samples([removed, kept], args)
    assert [it.reward for it in items] == [0.5, 2.0]
    assert items[0].loss_mask.tolist() == [0, 0] and items[1].loss_mask.tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="1 of 2 samples carry rollout_log_probs"):
        kept.rollout_log_probs = [0.0, 0.0, 0.0]
        items_from_samples([removed, kept], args)


@pytest.mark.parametrize("seed", range(5))
def test_micro_batches_keep_every_sample_once(seed):
    items = items_from_samples(random_samples(24, seed=seed), resolve_train_args(BASE))
    by_count = make_micro_batches(items, micro_batch_size=5)
    assert [len(mb) for mb in by_count] == [5, 5, 5, 5, 4]
    budget = 40
    by_tokens = make_micro_batches(items, max_tokens_per_gpu=budget)
    for batches in (by_count, by_tokens):
        assert sorted(it.index for mb in batches for it in mb) == list(range(24))
    for mb in by_tokens:
        assert len(mb) * max(it.total_length for it in mb) <= budget or len(mb) == 1
    # first-fit packs: no two micro-batches could have been merged within the budget
    sizes = [(len(mb), max(it.total_length for it in mb)) for mb in by_tokens]
    assert all((a[0] + b[0]) * max(a[1], b[1]) > budget for i, a in enumerate(sizes) for b in sizes[i + 1 :])
    long_one = make_micro_batches(items, max_tokens_per_gpu=5)
    assert all(len(mb) == 1 for mb in long_one) and len(long_one) == 24


def test_steps_and_data_parallel_shards_partition_the_rollout():
    items = items_from_samples(random_samples(12, seed=1), resolve_train_args(BASE))
    steps = split_steps(items, 6)
    assert [[it.index for it in step] for step in steps] == [list(range(6)), list(range(6, 12))]
    shards = [shard_for_data_parallel(steps[0], r, 3) for r in range(3)]
    assert sorted(it.index for shard in shards for it in shard) == list(range(6))
    loads = [sum(it.total_length for it in shard) for shard in shards]
    assert max(loads) - min(loads) <= max(it.total_length for it in steps[0])


@pytest.mark.parametrize(
    ("n", "global_batch_size", "min_step_size", "sizes"),
    [
        (16, 8, 1, [8, 8]),  # a full rollout: steps of global_batch_size, as always
        (24, 8, 1, [8, 8, 8]),
        (12, 8, 1, [6, 6]),  # short: the fewest steps of at most global_batch_size, as even as possible
        (13, 4, 1, [4, 3, 3, 3]),
        (3, 8, 1, [3]),
        (1, 8, 1, [1]),
        (5, 2, 2, [3, 2]),  # each of 2 data-parallel replicas needs a sample in every step: fewer steps
        (3, 1, 2, [3]),
    ],
)
def test_a_short_rollout_splits_into_fewer_or_smaller_steps(n, global_batch_size, min_step_size, sizes):
    items = items_from_samples(random_samples(n, seed=n), resolve_train_args(BASE))
    steps = split_steps(items, global_batch_size, min_step_size=min_step_size)
    assert [len(step) for step in steps] == sizes
    assert [it.index for step in steps for it in step] == list(range(n))


def test_a_rollout_too_small_for_the_replicas_is_refused():
    items = items_from_samples(random_samples(1, seed=0), resolve_train_args(BASE))
    with pytest.raises(
        ValueError, match="1 samples is too small to train on: every optimizer step needs at least 2"
    ):
        split_steps(items, 4, min_step_size=2)


def test_padding_masks_and_loss_batch():
    items = items_from_samples(random_samples(3, seed=2), resolve_train_args(BASE))
    items[1].per_token["advantages"] = torch.ones(items[1].response_length)
    for it in (items[0], items[2]):
        it.per_token["advantages"] = torch.zeros(it.response_length)
    mb = pad_micro_batch(items, pad_token_id=0)
    lengths = [it.total_length for it in items]
    assert len(set(lengths)) > 1  # so that some rows are padded
    assert mb.input_ids.shape == (3, max(lengths))
    for b, it in enumerate(items):
        n = it.total_length
        assert mb.attention_mask[b].tolist() == [1] * n + [0] * (mb.input_ids.shape[1] - n)
        assert torch.equal(mb.input_ids[b, :n], it.tokens) and mb.input_ids[b, n:].eq(0).all()
        assert mb.position_ids[b, :n].tolist() == list(range(n))
    assert mb.num_tokens == sum(lengths) and mb.padded_tokens == mb.input_ids.numel()
    batch = mb.loss_batch()
    assert batch["layout"] == "padded" and batch["total_lengths"] == lengths
    assert [a.numel() for a in batch["advantages"]] == batch["response_lengths"]
    assert set(batch) >= {"tokens", "loss_masks", "rollout_log_probs", "advantages"}


# ---- the train step through Megatron ---------------------------------------------------------


def test_micro_batching_does_not_change_the_step(tiny_dir):
    """Same samples, cut three ways: one optimizer step gives the same loss, grad norm and weights."""
    samples = random_samples(8, seed=3)
    results = []
    for per_token, cut in (
        (False, {"micro_batch_size": 1}),
        (False, {"max_tokens_per_gpu": 30}),
        (True, {"micro_batch_size": 4}),
        (True, {"max_tokens_per_gpu": 30}),
    ):
        trainer = Trainer({**BASE, **cut, "calculate_per_token_loss": per_token}, tiny_dir)
        try:
            metrics = trainer.train(samples, 0)
            results.append((per_token, metrics, logits_of(trainer, samples[:2])))
        finally:
            trainer.shutdown()
    for per_token in (False, True):
        runs = [(m, logits) for p, m, logits in results if p == per_token]
        (m0, logits0), others = runs[0], runs[1:]
        assert m0["grad_norm"] > 0.1
        for m, logits in others:
            for key in ("loss", "pg_loss", "entropy", "grad_norm", "train_rollout_logprob_abs_diff"):
                assert m[key] == pytest.approx(m0[key], rel=1e-5, abs=1e-6), key
            # fp32 sums in another order (the cut, and the CPU's kernels: 1.07e-5 on an AVX-512 host)
            assert (logits - logits0).abs().max() < 5e-5


@pytest.mark.slow
def test_grpo_raises_the_reward_of_a_tiny_policy(tiny_dir):
    """GRPO through the whole Megatron path (two steps per rollout, so the old-policy pass and the
    PPO ratio are used) pushes up the share of tokens whose id is a multiple of 4."""

    def reward(response):
        return sum(t % 4 == 0 for t in response) / len(response)

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    trainer = Trainer(
        {
            **BASE,
            "rollout_batch_size": 4,
            "n_samples_per_prompt": 8,
            "num_rollout": 12,
            "num_steps_per_rollout": 2,
            "micro_batch_size": 8,
            "lr": 5e-3,
        },
        tiny_dir,
    )
    try:
        rewards, diffs = [], []
        for rollout_id in range(12):
            samples = sample_rollout(
                trainer, gen, prompts=4, n=8, prompt_len=4, response_len=8, reward_fn=reward
            )
            metrics = trainer.train(samples, rollout_id)
            rewards.append(metrics["mean_reward"])
            diffs.append(metrics["train_rollout_logprob_abs_diff"])
            assert metrics["num_steps"] == 2 and math.isfinite(metrics["grad_norm"])
    finally:
        trainer.shutdown()
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.3, rewards
    # the trainer scores the engine's tokens exactly as the sampler did (same model, same math)
    assert max(diffs) < 1e-4


def test_reference_model_only_when_a_kl_term_needs_it(tiny_dir, monkeypatch):
    scored = []
    original = train_step.score_log_probs
    monkeypatch.setattr(
        train_step,
        "score_log_probs",
        lambda model, mbs, args, key: (scored.append(key), original(model, mbs, args, key)),
    )
    samples = random_samples(8, seed=4)
    trainer = Trainer(
        {**BASE, "use_kl_loss": True, "kl_loss_coef": 0.5, "kl_loss_type": "low_var_kl"}, tiny_dir
    )
    try:
        assert trainer.ref is not None
        first = trainer.train(samples, 0)
        assert abs(first["kl_loss"]) < 1e-6  # the policy is the reference before its first step
        assert scored == ["ref_log_probs"]  # one step per rollout: no separate old-policy pass
        second = trainer.train(samples, 1)
        assert second["kl_loss"] > 1e-5
    finally:
        trainer.shutdown()
    scored.clear()
    trainer = Trainer({**BASE, "num_steps_per_rollout": 2}, tiny_dir)
    try:
        assert trainer.ref is None
        metrics = trainer.train(samples, 0)
        assert "kl_loss" not in metrics and scored == ["log_probs"]
        # the second step's ratio moved away from 1: the old-policy log-probs are really the old ones
        assert metrics["steps"][0]["ppo_kl"] == pytest.approx(0.0, abs=1e-7)
        assert abs(metrics["steps"][1]["ppo_kl"]) > 1e-6
    finally:
        trainer.shutdown()


def test_the_trainer_resolves_the_objective_options_once(tiny_dir, monkeypatch):
    trainer = Trainer({**BASE, "eps_clip": 0.3, "num_steps_per_rollout": 2}, tiny_dir)
    try:
        assert trainer.objective == ObjectiveOptions.from_args(trainer.args)
        assert trainer.objective.eps_clip_high == 0.3
        validated = []
        validate = ObjectiveOptions.model_validate.__func__

        def counting(cls, *args, **kwargs):
            validated.append(cls)
            return validate(cls, *args, **kwargs)

        monkeypatch.setattr(ObjectiveOptions, "model_validate", classmethod(counting))
        metrics = trainer.train(random_samples(8, seed=5), 0)
        assert metrics["num_steps"] == 2 and math.isfinite(metrics["loss"])
        assert validated == []  # every advantage and micro-batch loss took the trainer's options as they are
        ObjectiveOptions.from_args(trainer.args)
        assert validated == [ObjectiveOptions]
    finally:
        trainer.shutdown()


def test_resume_from_a_checkpoint_is_exact(tiny_dir, tmp_path):
    settings = {
        **BASE,
        "num_steps_per_rollout": 2,
        "micro_batch_size": 2,
        "lr_decay_style": "cosine",
        "lr_warmup_iters": 1,
        "num_rollout": 3,
    }
    rollouts = [random_samples(8, seed=10 + k) for k in range(3)]
    logits_at_save, expected, logits_after = train_save_and_go_on(
        Trainer(settings, tiny_dir),
        rollouts,
        tmp_path / "ckpts" / "000001",
        lambda t: logits_of(t, rollouts[2]),
    )

    # load names the folder of checkpoints: the latest one is taken; a different seed changes nothing
    trainer = Trainer({**settings, "load": str(tmp_path / "ckpts"), "seed": 99}, tiny_dir)
    try:
        assert (trainer.step, trainer.rollout_id) == (4, 1)
        assert torch.equal(logits_of(trainer, rollouts[2]), logits_at_save)
        resumed = trainer.train(rollouts[2], 2)
        for key in ("loss", "pg_loss", "grad_norm", "lr", "ppo_kl"):
            assert resumed[key] == expected[key], key
        assert torch.equal(logits_of(trainer, rollouts[2]), logits_after)
    finally:
        trainer.shutdown()
    # an empty load folder: start from the HF weights (slime's semantics)
    trainer = Trainer({**settings, "load": str(tmp_path / "empty")}, tiny_dir)
    try:
        assert trainer.step == 0 and not torch.equal(logits_of(trainer, rollouts[2]), logits_at_save)
        with pytest.raises(FileNotFoundError, match="no trainer checkpoint"):
            trainer.load(tmp_path / "empty")
    finally:
        trainer.shutdown()


def test_a_short_rollout_trains_like_a_campaign_sized_for_it(tiny_dir):
    """A rollout of 3 groups where 4 were expected (a dynamic filter kept too few) trains in the
    configured 2 steps of 3 samples instead of 4, each step's loss the mean over its own samples:
    exactly what a campaign of 3 groups per rollout does with the same samples."""
    samples = random_samples(6, seed=12)
    for i, sample in enumerate(samples):
        sample.group_index = i // 2
    common = {**BASE, "n_samples_per_prompt": 2, "num_steps_per_rollout": 2, "lr": 1e-2}
    results = []
    for rollout_batch_size in (4, 3):
        trainer = Trainer({**common, "rollout_batch_size": rollout_batch_size}, tiny_dir)
        try:
            assert trainer.args.global_batch_size == rollout_batch_size  # n_samples_per_prompt 2 over 2 steps
            metrics = trainer.train(samples, 0)
            results.append((metrics, logits_of(trainer, samples), trainer.step))
        finally:
            trainer.shutdown()
    (short, short_logits, short_step), (sized, sized_logits, _) = results
    assert (short["samples"], short["num_steps"], short["applied_steps"], short_step) == (6, 2, 2, 2)
    assert [step["samples"] for step in short["steps"]] == [3, 3]
    for got, want in zip(short["steps"], sized["steps"], strict=True):
        for key in ("loss", "pg_loss", "grad_norm", "ppo_kl", "tokens"):
            assert got[key] == want[key], key
    assert torch.equal(short_logits, sized_logits)
    assert short["steps"][1]["ppo_kl"] != 0  # the second step's ratio is against the old policy


def test_learning_rate_schedule(tiny_dir):
    trainer = Trainer(
        {
            **BASE,
            "lr": 1e-2,
            "min_lr": 1e-3,
            "lr_warmup_iters": 2,
            "lr_decay_style": "cosine",
            "lr_decay_iters": 6,
            "global_batch_size": 2,
        },
        tiny_dir,
    )
    try:
        metrics = trainer.train(random_samples(8, seed=5), 0)
    finally:
        trainer.shutdown()
    lrs = [step["lr"] for step in metrics["steps"]]
    # Megatron's warmup starts at 0; then cosine from lr towards min_lr over steps 2..6
    cosine = [1e-3 + 0.5 * (1 + math.cos(math.pi * (s - 2) / 4)) * 9e-3 for s in (2, 3)]
    assert lrs == pytest.approx([0.0, 5e-3, *cosine])
    assert metrics["steps"][0]["grad_norm"] > 0


def test_export_hf_loads_in_transformers(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    samples = random_samples(8, seed=6)
    trainer = Trainer({**BASE, "lr": 1e-2}, tiny_dir)
    try:
        trainer.train(samples, 0)
        out = trainer.export_hf(tmp_path / "export")
        mb = pad_micro_batch(items_from_samples(samples, trainer.args))
        with torch.no_grad():
            ours = forward_logits(trainer.actor, mb.input_ids, mb.attention_mask, mb.position_ids)
    finally:
        trainer.shutdown()
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
    keep = mb.attention_mask.bool()
    assert (ours - theirs)[keep].abs().max() < 1e-4
    original = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        before = original(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
    assert (before - theirs)[keep].abs().max() > 1e-3  # the export holds the trained weights
    assert AutoTokenizer.from_pretrained(out).eos_token == "<|im_end|>"
