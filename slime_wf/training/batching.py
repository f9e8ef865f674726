"""From a rollout's `Sample`s to padded micro-batches.

A rollout is split, in order, into optimizer steps of `global_batch_size` samples (a short
rollout, which a dynamic filter leaves when it keeps too few groups, into the fewest steps of at
most that many samples, as even as possible; see `split_steps`); a step's
samples are shared among the data-parallel ranks (balanced by tokens) and each rank's share
is cut into micro-batches, either `micro_batch_size` samples at a time or, with
`max_tokens_per_gpu`, first-fit by length so that every padded micro-batch holds at most that
many tokens. Samples are ordered longest first within a step before cutting, so a micro-batch
holds sequences of similar length and little padding; the step's loss does not depend on the
cut (`objectives.step_normalizer`).

Micro-batches are right-padded `[B, L]` with an attention mask. Padding rather than packing:
Megatron's local layer spec takes one explicit `[b, 1, s, s]` mask, so packing several
sequences into one row needs a block-diagonal mask over the whole packed row, whose attention
cost grows with the square of the row length; `benchmarks/train.py` measures both.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from slime_wf.types import Sample

logger = logging.getLogger(__name__)


@dataclass
class TrainItem:
    """One sample as the trainer uses it. `per_token` gathers the `[response_length]` float32
    tensors computed for it during training (advantages, returns, log_probs, ref_log_probs)."""

    index: int  # position in the rollout (groups are adjacent)
    tokens: torch.Tensor  # [total_length] int64, prompt + response
    response_length: int
    loss_mask: torch.Tensor  # [response_length] float32
    reward: float
    rollout_log_probs: torch.Tensor | None = None  # [response_length] float32, the engine's
    per_token: dict[str, torch.Tensor] = field(default_factory=dict)
    group_index: int | None = None  # the sample's group, for messages

    @property
    def total_length(self) -> int:
        return int(self.tokens.numel())


def _where(sample: Sample, position: int) -> str:
    return f"sample {position} (group_index={sample.group_index}, index={sample.index})"


def items_from_samples(samples: Sequence[Sample], args: Any) -> list[TrainItem]:
    """Check each sample's training fields and turn them into tensors.

    The scalar reward comes from `Sample.get_reward_value(args)` (honouring `reward_key`). A
    sample marked `remove_sample` stays in the batch (its group's statistics count it) with an
    all-zero loss mask, as slime does.
    """
    items = []
    for i, sample in enumerate(samples):
        n, r = len(sample.tokens), int(sample.response_length)
        if not 0 <= r < n:
            raise ValueError(
                f"{_where(sample, i)}: response_length={r} with {n} tokens; the tokens must hold the prompt "
                "(at least one token) followed by the response"
            )
        mask = sample.loss_mask if sample.loss_mask is not None else [1] * r
        if len(mask) != r:
            raise ValueError(
                f"{_where(sample, i)}: loss_mask has {len(mask)} entries but response_length is {r}"
            )
        if sample.remove_sample:
            mask = [0] * r
        reward = sample.get_reward_value(args)
        if reward is None or isinstance(reward, bool) or not isinstance(reward, int | float):
            raise ValueError(
                f"{_where(sample, i)}: reward {reward!r} is not a number; score the rollout before training "
                "(or set reward_key to the numeric entry of a dict reward)"
            )
        rollout_lp = None
        if sample.rollout_log_probs is not None:
            if len(sample.rollout_log_probs) != r:
                raise ValueError(
                    f"{_where(sample, i)}: rollout_log_probs has {len(sample.rollout_log_probs)} entries but "
                    f"response_length is {r}"
                )
            rollout_lp = torch.tensor(sample.rollout_log_probs, dtype=torch.float32)
        items.append(
            TrainItem(
                index=i,
                tokens=torch.tensor(sample.tokens, dtype=torch.long),
                response_length=r,
                loss_mask=torch.tensor(mask, dtype=torch.float32),
                reward=float(reward),
                rollout_log_probs=rollout_lp,
                group_index=sample.group_index,
            )
        )
    have_lp = sum(item.rollout_log_probs is not None for item in items)
    if 0 < have_lp < len(items):
        raise ValueError(
            f"{have_lp} of {len(items)} samples carry rollout_log_probs: give them for all or none"
        )
    return items


def split_steps(
    items: Sequence[TrainItem], global_batch_size: int, *, min_step_size: int = 1
) -> list[list[TrainItem]]:
    """Consecutive optimizer steps, in rollout order: `global_batch_size` samples each when the
    rollout is a multiple of it; otherwise (a short rollout) the fewest steps of at most
    `global_batch_size` samples, their sizes differing by at most one. Each step's loss is the mean
    over its own samples (`objectives.step_normalizer`), so a smaller step is no weaker per sample.

    Every step gets at least `min_step_size` samples (the data-parallel size: each replica needs a
    sample in every step), with fewer steps when needed.
    """
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be > 0, got {global_batch_size}")
    if len(items) < max(min_step_size, 1):
        raise ValueError(
            f"a rollout of {len(items)} samples is too small to train on: every optimizer step needs at least "
            f"{max(min_step_size, 1)} (one per data-parallel replica); the rollout kept too few groups"
        )
    num_steps = min(-(-len(items) // global_batch_size), len(items) // max(min_step_size, 1))
    size, extra = divmod(len(items), num_steps)
    steps, start = [], 0
    for s in range(num_steps):
        end = start + size + (1 if s < extra else 0)
        steps.append(list(items[start:end]))
        start = end
    return steps


def shard_for_data_parallel(items: Sequence[TrainItem], dp_rank: int, dp_size: int) -> list[TrainItem]:
    """This data-parallel rank's share of a step: longest first, each sample to the rank with the
    fewest tokens so far (ties to the lower rank), so every rank gets about the same work."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} is outside data-parallel size {dp_size}")
    if dp_size == 1:
        return list(items)
    load = [0] * dp_size
    mine = []
    for item in sorted(items, key=lambda it: (-it.total_length, it.index)):
        target = min(range(dp_size), key=lambda r: (load[r], r))
        load[target] += item.total_length
        if target == dp_rank:
            mine.append(item)
    return sorted(mine, key=lambda it: it.index)


def make_micro_batches(
    items: Sequence[TrainItem], *, micro_batch_size: int = 1, max_tokens_per_gpu: int | None = None
) -> list[list[TrainItem]]:
    """Micro-batches of `items` (every item exactly once), longest first.

    With `max_tokens_per_gpu`, first-fit: each item goes into the first micro-batch whose padded
    size (samples x longest length) stays within the budget, else into a new one; an item
    longer than the budget goes alone. Otherwise `micro_batch_size` items at a time.
    """
    ordered = sorted(items, key=lambda it: (-it.total_length, it.index))
    if max_tokens_per_gpu is None:
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be > 0, got {micro_batch_size}")
        return [ordered[s : s + micro_batch_size] for s in range(0, len(ordered), micro_batch_size)]
    if max_tokens_per_gpu <= 0:
        raise ValueError(f"max_tokens_per_gpu must be > 0, got {max_tokens_per_gpu}")
    batches: list[list[TrainItem]] = []
    longest: list[int] = []
    for item in ordered:
        n = item.total_length
        if n > max_tokens_per_gpu:
            logger.warning(
                "a sample of %d tokens exceeds max_tokens_per_gpu=%d; it gets a micro-batch of its own",
                n,
                max_tokens_per_gpu,
            )
        for b, batch in enumerate(batches):
            if (len(batch) + 1) * max(longest[b], n) <= max_tokens_per_gpu:
                batch.append(item)
                longest[b] = max(longest[b], n)
                break
        else:
            batches.append([item])
            longest.append(n)
    return batches


@dataclass
class PaddedBatch:
    """A right-padded micro-batch: model inputs plus the per-sample lists the loss reads."""

    items: list[TrainItem]
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L], 1 = token
    position_ids: torch.Tensor  # [B, L]

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) tokens."""
        return sum(item.total_length for item in self.items)

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.numel())

    def loss_batch(self, device: torch.device | str | None = None) -> dict[str, Any]:
        """The dict `objectives.loss_function` takes, with per-token entries on `device`."""

        def on(t):
            return t.to(device) if device is not None else t

        batch: dict[str, Any] = {
            "tokens": [on(item.tokens) for item in self.items],
            "total_lengths": [item.total_length for item in self.items],
            "response_lengths": [item.response_length for item in self.items],
            "loss_masks": [on(item.loss_mask) for item in self.items],
            "layout": "padded",
        }
        if self.items and self.items[0].rollout_log_probs is not None:
            batch["rollout_log_probs"] = [on(item.rollout_log_probs) for item in self.items]
        for key in self.items[0].per_token if self.items else ():
            batch[key] = [on(item.per_token[key]) for item in self.items]
        return batch


def pad_micro_batch(
    items: Sequence[TrainItem],
    *,
    pad_token_id: int = 0,
    device: torch.device | str = "cpu",
) -> PaddedBatch:
    """Right-pad `items` to their longest length."""
    if not items:
        raise ValueError("a micro-batch needs at least one sample")
    length = max(item.total_length for item in items)
    input_ids = torch.full((len(items), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), length), dtype=torch.long)
    for b, item in enumerate(items):
        input_ids[b, : item.total_length] = item.tokens
        attention_mask[b, : item.total_length] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return PaddedBatch(
        items=list(items),
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        position_ids=position_ids.to(device),
    )
