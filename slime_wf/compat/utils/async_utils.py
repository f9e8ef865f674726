"""`slime.utils.async_utils`: running a coroutine from the synchronous code of a custom rollout function."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from slime_wf.rollout.generate import current_context

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to completion and return its result (slime's `run`).

    Inside a custom rollout function the coroutine runs on the rollout's event loop, where its
    engine session lives (the function itself runs in a worker thread); elsewhere on a new loop.
    """
    try:
        loop = current_context().plugin_state.get("event_loop")
    except RuntimeError:
        loop = None
    if loop is None or not loop.is_running():
        return asyncio.run(coro)
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        coro.close()
        raise RuntimeError("run() was called on the rollout's own event loop: await the coroutine instead")
    return asyncio.run_coroutine_threadsafe(coro, loop).result()


__all__ = ["run"]
