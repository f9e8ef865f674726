"""`slime.rollout.filter_hub.base_types`: the filter output type, the drop rule, and slime's metric gatherer.

`DynamicFilterOutput` is slime-wf's own class; the rollout accepts any output of that shape anyway
(`keep`, optional `reason` and `keep_when_insufficient`), or a bool.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from slime_wf.rollout.filter_hub.base_types import (
    DynamicFilterOutput,
    as_filter_output,
    should_drop_dynamic_filter_output,
)


def call_dynamic_filter(fn: Callable[..., Any] | None, *args: Any, **kwargs: Any) -> DynamicFilterOutput:
    """slime's calling convention: `fn(*args, **kwargs)`, None keeps everything."""
    if fn is None:
        return DynamicFilterOutput(keep=True)
    return as_filter_output(fn(*args, **kwargs), getattr(fn, "__qualname__", repr(fn)))


class MetricGatherer:
    """Counts drops by reason as `rollout/dynamic_filter/drop_<reason>` (slime's)."""

    def __init__(self) -> None:
        self._drops: Counter[str] = Counter()

    def on_dynamic_filter_drop(self, reason: str | None) -> None:
        if reason:
            self._drops[reason] += 1

    def collect(self) -> dict[str, int]:
        return {f"rollout/dynamic_filter/drop_{reason}": n for reason, n in self._drops.items()}


__all__ = [
    "DynamicFilterOutput",
    "MetricGatherer",
    "call_dynamic_filter",
    "should_drop_dynamic_filter_output",
]
