"""Custom reward functions loaded by dotted path, and how each kind is run under a time limit.

- `async def rm(args, sample)` (slime's contract) runs on the rollout's event loop, so it can
  share sessions and clients with the rest of the rollout, and is bounded with
  `asyncio.timeout`. A coroutine only yields at an `await`: one that computes for minutes
  without awaiting stalls the loop, and no timer can interrupt it. Such stalls are measured and
  reported (`rm/loop_stalls`, with the function and sample named).
- `def rm(args, sample)` (plain, CPU-bound: sympy, regexes) runs in the grader worker pool,
  where the timeout is enforced by killing the worker. This is the way to write an expensive
  grader. The sample travels to the worker and back, so changes the function makes to it (e.g.
  to `sample.metadata`) are kept; it must be picklable, as must `args` and the result.
"""

from __future__ import annotations

import asyncio
import inspect
import numbers
import sys
from typing import Any

from slime_wf.plugins import load_function

WORKER_TARGET = "slime_wf.rollout.rm_hub.custom:run_in_worker"


def is_async(fn: Any) -> bool:
    # A callable object with an async __call__ counts too.
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


def load(path: str) -> Any:
    return load_function(path, num_positional=2, kind="custom reward function")


_worker_loop: asyncio.AbstractEventLoop | None = None


def run_in_worker(path: str, args: Any, subject: Any, kwargs: dict[str, Any], sys_path: list[str]) -> tuple:
    """Worker side: call the function, and send back its result and the (possibly changed) subject."""
    global _worker_loop
    if sys.path != sys_path:
        sys.path[:] = sys_path
    result = load(path)(args, subject, **kwargs)
    if inspect.isawaitable(result):
        # One loop for the worker's lifetime, so clients the function caches stay usable.
        if _worker_loop is None:
            _worker_loop = asyncio.new_event_loop()
        result = _worker_loop.run_until_complete(result)
    return result, subject


def copy_back(target: Any, returned: Any) -> None:
    """Apply the worker's copy of a sample (or list of samples) to the caller's objects."""
    if isinstance(target, list):
        for mine, theirs in zip(target, returned, strict=True):
            copy_back(mine, theirs)
    elif hasattr(target, "__dict__") and hasattr(returned, "__dict__"):
        vars(target).update(vars(returned))


def check_reward(value: Any) -> None:
    if isinstance(value, dict) or (isinstance(value, numbers.Number) and not isinstance(value, complex)):
        return
    raise TypeError(f"it returned {type(value).__name__} {str(value)[:100]!r}; expected a number or a dict")


def check_group_rewards(values: Any, n: int) -> None:
    if not isinstance(values, list | tuple) or len(values) != n:
        got = (
            f"a {type(values).__name__} of length {len(values)}"
            if isinstance(values, list | tuple)
            else repr(values)
        )
        raise TypeError(
            f"with group_rm it must return a list of {n} rewards, one per sample; got {got[:200]}"
        )
    for i, value in enumerate(values):
        try:
            check_reward(value)
        except TypeError as err:
            raise TypeError(f"reward {i} of the group: {err}") from None
