"""Gradings computed once: finished results, and gradings in flight that identical requests join.

A key is `(rm_type, label, the part of the response the grader reads)` (see rules.reduce);
a key that is not a tuple marks a grading that must not be shared. Failed gradings are kept
too: a response that timed out once would time out again. The rollout loop clears the cache
once per rollout, which bounds its size.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True, unsafe_hash=True)  # not frozen: frozen dataclasses are slow to build
class Pending:
    """A grading in flight that another request submitted: its pool batch future and its position in that batch."""

    future: Any
    index: int


class GradingCache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done: dict[Any, Any] = {}
        self._inflight: dict[Any, tuple[Any, int]] = {}  # key -> (batch future, position in it)

    def lookup(self, keys: list[Any]) -> tuple[dict[Any, Any], dict[Any, Pending], list[Any]]:
        """(finished outcomes, gradings in flight to join, keys nobody is grading)."""
        done, joined, new = {}, {}, []
        finished, inflight = self._done, self._inflight
        with self._lock:
            for key in keys:
                if key in finished:
                    done[key] = finished[key]
                elif key in inflight:
                    future, index = inflight[key]
                    joined[key] = Pending(future, index)
                else:
                    new.append(key)
        return done, joined, new

    def start(self, keys: list[Any], future: Any) -> None:
        """Register the gradings of `keys`, submitted together as one batch `future` (the
        submitter knows its own keys' positions: no per-key record is returned)."""
        with self._lock:
            self._inflight.update({key: (future, i) for i, key in enumerate(keys)})

    def finish(self, keys: list[Any], outcomes: list[Any] | None) -> None:
        """Record a batch's outcomes (None: it failed as a whole, nothing to keep)."""
        with self._lock:
            for key in keys:
                self._inflight.pop(key, None)
            if outcomes is not None:
                self._done.update(
                    (key, outcome)
                    for key, outcome in zip(keys, outcomes, strict=True)
                    if isinstance(key, tuple)
                )

    def clear(self) -> None:
        with self._lock:
            self._done.clear()

    def __len__(self) -> int:
        return len(self._done)
