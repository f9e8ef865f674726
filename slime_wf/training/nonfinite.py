"""Non-finite values in training: what a step's loss would read that is not finite, and the error
that stops training after too many skipped steps in a row (see `train_step`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from slime_wf.training.batching import TrainItem


class NonFiniteTrainingError(RuntimeError):
    """Training stopped: `max_consecutive_skipped_steps` optimizer steps in a row were skipped
    because a loss, a gradient norm or an input was not finite. `skips` describes the skipped
    steps of this rollout; `applied_steps` counts the policy updates it made before stopping."""

    def __init__(
        self, message: str, *, rollout_id: int | None, skips: list[str], consecutive: int, applied_steps: int
    ) -> None:
        super().__init__(message)
        self.rollout_id = rollout_id
        self.skips = skips
        self.consecutive = consecutive
        self.applied_steps = applied_steps


def nonfinite_inputs(items: Sequence[TrainItem], args: Any) -> list[str]:
    """What a step's loss would read that is not finite, one entry per sample: its reward, and
    the per-token advantages, returns, values and log-probs (the engine's when the loss uses
    them). A masked-out token counts too: the loss multiplies it by a zero mask, and NaN x 0 is NaN."""
    engine_log_probs = args.use_tis or args.use_rollout_logprobs
    found = []
    for item in items:
        bad = [] if math.isfinite(item.reward) else [f"reward {item.reward}"]
        tensors = dict(item.per_token)
        if engine_log_probs and item.rollout_log_probs is not None:
            tensors["rollout_log_probs"] = item.rollout_log_probs
        bad += [key for key, values in tensors.items() if not bool(torch.isfinite(values).all())]
        if bad:
            found.append(f"sample {item.index} (group {item.group_index}): {', '.join(bad)}")
    return found


def describe(found: list[str], limit: int = 4) -> str:
    """The first `limit` entries of `nonfinite_inputs`, and how many more there are."""
    more = f" and {len(found) - limit} more" if len(found) > limit else ""
    return "; ".join(found[:limit]) + more


def skip_message(rollout_id: int | None, skips: list[str], consecutive: int, limit: int) -> str:
    """The message of `NonFiniteTrainingError`: where, what was not finite, and what to do."""
    earlier = consecutive - len(skips)
    where = f"rollout {rollout_id}" if rollout_id is not None else "this rollout"
    before = f" (and the {earlier} before them, in earlier rollouts)" if earlier > 0 else ""
    return (
        f"{where}: {consecutive} optimizer steps in a row were skipped because of non-finite values "
        f"(train.max_consecutive_skipped_steps={limit}); nothing non-finite reached the weights. Skipped here"
        f"{before}: " + " | ".join(skips) + ". What to do: check the reward model and the engine's log-probs "
        "for NaN/inf (a non-finite reward or advantage skips its step), lower train.lr or train.clip_grad if the "
        "loss or gradient norm diverged, then resume from the committed checkpoint (it keeps the count of "
        "skipped steps); raise train.max_consecutive_skipped_steps to tolerate more."
    )
