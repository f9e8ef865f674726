"""Reward models: slime's entry points over rule-based graders, remote_rm and custom functions.

`async_rm(args, sample)` and `batched_async_rm(args, samples)` keep slime's signatures, so a
slime user's code that calls them works unchanged. They take an optional `hub=` (a
`RewardHub`: the worker pool, the grading cache and the counters of one rollout loop); without
one they use a default hub created on first use and closed at exit (`close_default_hub()`
closes it earlier). See `hub.py` for how a reward is chosen and bounded in time.

Rule-based types: deepscaler, math, dapo (a dict: use reward_key=score), f1, math_verify, and
boxed_<type> (grade only the last `\\boxed{}` content); remote_rm POSTs to `rm_url`.
"""

from __future__ import annotations

import threading
from typing import Any

from .hub import RewardError, RewardHub
from .pool import GraderPool
from .remote import RemoteRewardError, RemoteRewardTimeout
from .rules import grade

_default_hub: RewardHub | None = None
_default_lock = threading.Lock()


def default_hub() -> RewardHub:
    """The hub used when a call passes none (one per process, created on first use)."""
    global _default_hub
    with _default_lock:
        if _default_hub is None or _default_hub.closed:
            _default_hub = RewardHub()
        return _default_hub


def close_default_hub() -> None:
    global _default_hub
    with _default_lock:
        hub, _default_hub = _default_hub, None
    if hub is not None:
        hub.close()


async def async_rm(args: Any, sample: Any, hub: RewardHub | None = None, **kwargs: Any) -> Any:
    """The reward of one sample (a number, or a dict such as dapo's)."""
    return await (hub or default_hub()).async_rm(args, sample, **kwargs)


async def batched_async_rm(args: Any, samples: list[Any], hub: RewardHub | None = None, **kwargs: Any) -> list[Any]:
    """The rewards of `samples`, in order; with group_rm, one custom call per group."""
    return await (hub or default_hub()).batched_async_rm(args, samples, **kwargs)


async def remote_rm(args: Any, sample: Any, hub: RewardHub | None = None) -> Any:
    """The reward server's answer for one sample (POST {prompt, response, label} to args.rm_url)."""
    return await (hub or default_hub()).remote_rm(args, sample)


__all__ = [
    "GraderPool",
    "RemoteRewardError",
    "RemoteRewardTimeout",
    "RewardError",
    "RewardHub",
    "async_rm",
    "batched_async_rm",
    "close_default_hub",
    "default_hub",
    "grade",
    "remote_rm",
]
