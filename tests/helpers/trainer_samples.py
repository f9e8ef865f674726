"""Samples and steps shared by the trainer tests: random rollouts, the base settings, a sampled rollout
scored by a reward function, and train-save-go-on for resume checks."""

from __future__ import annotations

import random

import torch

from slime_wf.training.batching import items_from_samples, pad_micro_batch
from slime_wf.training.model import forward_logits
from slime_wf.types import Sample


def random_samples(n: int, *, seed: int, vocab: int = 60, with_rollout_lp: bool = True) -> list[Sample]:
    """Ragged prompt + response token lists with random rewards, in groups of 4."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(4, vocab) for _ in range(rng.randint(2, 9))]
        response = [rng.randrange(4, vocab) for _ in range(rng.randint(1, 12))]
        out.append(
            Sample(
                group_index=i // 4,
                index=i,
                tokens=prompt + response,
                response_length=len(response),
                reward=float(rng.random()),
                rollout_log_probs=[-rng.random() * 3 for _ in response] if with_rollout_lp else None,
            )
        )
    return out


BASE = dict(rollout_batch_size=2, n_samples_per_prompt=4, lr=1e-3, weight_decay=0.0, num_rollout=4, seed=0)


# ---- settings --------------------------------------------------------------------------------


def logits_of(trainer, samples):
    mb = pad_micro_batch(items_from_samples(samples, trainer.args))
    with torch.no_grad():
        return forward_logits(trainer.actor, mb.input_ids, mb.attention_mask, mb.position_ids)


def sample_rollout(trainer, gen, *, prompts: int, n: int, prompt_len: int, response_len: int, reward_fn):
    """Responses drawn from the trainer's own policy (temperature 1), with their log-probs."""
    vocab = trainer.actor.hf_arch.vocab_size
    seq = torch.randint(4, vocab, (prompts, prompt_len), generator=gen).repeat_interleave(n, 0)
    log_probs = []
    with torch.no_grad():
        for _ in range(response_len):
            logp = torch.log_softmax(forward_logits(trainer.actor, seq)[:, -1].float(), dim=-1)
            token = torch.multinomial(logp.exp(), 1, generator=gen)
            log_probs.append(logp.gather(1, token))
            seq = torch.cat([seq, token], dim=1)
    log_probs = torch.cat(log_probs, dim=1)
    return [
        Sample(
            group_index=i // n,
            index=i,
            tokens=seq[i].tolist(),
            response_length=response_len,
            reward=reward_fn(seq[i, prompt_len:].tolist()),
            rollout_log_probs=log_probs[i].tolist(),
        )
        for i in range(prompts * n)
    ]


def train_save_and_go_on(trainer, rollouts, path, observe):
    """Train on rollouts 0 and 1, save at `path` as rollout 1, train on rollout 2, shut down; returns
    (observe(trainer) at the save, rollout 2's metrics, observe(trainer) after it)."""
    try:
        trainer.train(rollouts[0], 0)
        trainer.train(rollouts[1], 1)
        trainer.save(path, rollout_id=1)
        at_save = observe(trainer)
        metrics = trainer.train(rollouts[2], 2)
        return at_save, metrics, observe(trainer)
    finally:
        trainer.shutdown()
