"""Built-in dynamic-sampling filters (slime's): drop groups whose rewards are all the same.

A group where every sample got the same reward has zero advantage under GRPO and teaches
nothing; the reason `zero_std_<reward rounded to 1 decimal>` tells all-wrong from all-right.
"""

from __future__ import annotations

import math
from typing import Any

from .base_types import DynamicFilterOutput

__all__ = ["check_reward_nonzero_std", "check_reward_nonzero_std_with_fallback"]

MIN_STD = 1e-6


def _sample_std(values: list[float]) -> float:
    """Standard deviation with Bessel's correction (torch.std's default); NaN below 2 values."""
    if len(values) < 2:
        return math.nan
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def check_reward_nonzero_std(args: Any, samples: list[Any], **kwargs: Any) -> DynamicFilterOutput:
    """Keep the group when its rewards are not all equal (std > 1e-6)."""
    # An entry may be a list of fragments of one trajectory, all carrying the same reward.
    if not samples:
        raise ValueError("check_reward_nonzero_std: the group is empty")
    rewards = [(s[0] if isinstance(s, list) else s).get_reward_value(args) for s in samples]
    keep = _sample_std([float(r) for r in rewards]) > MIN_STD
    return DynamicFilterOutput(keep=keep, reason=None if keep else f"zero_std_{round(rewards[0], 1)}")


def check_reward_nonzero_std_with_fallback(
    args: Any, samples: list[Any], **kwargs: Any
) -> DynamicFilterOutput:
    """As check_reward_nonzero_std, but a dropped group may still fill an otherwise short batch."""
    output = check_reward_nonzero_std(args, samples, **kwargs)
    output.keep_when_insufficient = True
    return output
