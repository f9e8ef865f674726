"""Reward models: slime's entry points over rule-based graders, remote_rm and custom functions.

`async_rm(args, sample)` and `batched_async_rm(args, samples)` keep slime's signatures, so a
slime user's code that calls them works unchanged. They take an optional `hub=` (a
`RewardHub`: the worker pool, the grading cache and the counters of one rollout loop); without
one they use the hub of the rollout they run in (`using_hub`, which the rollout loop and the
evaluation enter with the campaign's hub). There is no process-wide hub: outside a rollout, create
a `RewardHub` and pass it. See `hub.py` for how a reward is chosen and bounded in time.

Rule-based types: deepscaler, math, dapo (a dict: use reward_key=score), f1, math_verify, and
boxed_<type> (grade only the last `\\boxed{}` content); remote_rm POSTs to `rm_url`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

from .hub import RewardError, RewardHub
from .pool import GraderPool
from .remote import RemoteRewardError, RemoteRewardTimeout
from .rules import grade

_rollout_hub: contextvars.ContextVar[RewardHub] = contextvars.ContextVar("slime_wf_rollout_reward_hub")


@contextlib.contextmanager
def using_hub(hub: RewardHub) -> Iterator[RewardHub]:
    """Make `hub` the one that calls without `hub=` use, inside this block (and the tasks it starts)."""
    token = _rollout_hub.set(hub)
    try:
        yield hub
    finally:
        _rollout_hub.reset(token)


def _hub(hub: RewardHub | None) -> RewardHub:
    if hub is not None:
        return hub
    try:
        return _rollout_hub.get()
    except LookupError:
        raise RuntimeError(
            "no reward hub: outside a rollout, pass hub=RewardHub() (and close it when done), "
            "or enter rm_hub.using_hub(hub) first"
        ) from None


async def async_rm(args: Any, sample: Any, hub: RewardHub | None = None, **kwargs: Any) -> Any:
    """The reward of one sample (a number, or a dict such as dapo's)."""
    return await _hub(hub).async_rm(args, sample, **kwargs)


async def batched_async_rm(
    args: Any, samples: list[Any], hub: RewardHub | None = None, **kwargs: Any
) -> list[Any]:
    """The rewards of `samples`, in order; with group_rm, one custom call per group."""
    return await _hub(hub).batched_async_rm(args, samples, **kwargs)


async def remote_rm(args: Any, sample: Any, hub: RewardHub | None = None) -> Any:
    """The reward server's answer for one sample (POST {prompt, response, label} to args.rm_url)."""
    return await _hub(hub).remote_rm(args, sample)


__all__ = [
    "GraderPool",
    "RemoteRewardError",
    "RemoteRewardTimeout",
    "RewardError",
    "RewardHub",
    "async_rm",
    "batched_async_rm",
    "grade",
    "remote_rm",
    "using_hub",
]
