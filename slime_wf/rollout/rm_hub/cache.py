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


@dataclass(frozen=True)
class Pending:
    """A grading in flight: its pool batch future and its position in that batch."""

    future: Any
    index: int
    owner: bool  # whether this request submitted it (else it joined another request's)


class GradingCache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done: dict[Any, Any] = {}
        self._inflight: dict[Any, Pending] = {}

    def lookup(self, keys: list[Any]) -> tuple[dict[Any, Any], dict[Any, Pending], list[Any]]:
        """(finished outcomes, gradings in flight to join, keys nobody is grading)."""
        done, joined, new = {}, {}, []
        with self._lock:
            for key in keys:
                if key in self._done:
                    done[key] = self._done[key]
                elif key in self._inflight:
                    joined[key] = Pending(self._inflight[key].future, self._inflight[key].index, owner=False)
                else:
                    new.append(key)
        return done, joined, new

    def start(self, keys: list[Any], future: Any) -> dict[Any, Pending]:
        """Register the gradings of `keys`, submitted together as one batch `future`."""
        started = {key: Pending(future, i, owner=True) for i, key in enumerate(keys)}
        with self._lock:
            self._inflight.update(started)
        return started

    def finish(self, keys: list[Any], outcomes: list[Any] | None) -> None:
        """Record a batch's outcomes (None: it failed as a whole, nothing to keep)."""
        with self._lock:
            for i, key in enumerate(keys):
                self._inflight.pop(key, None)
                if outcomes is not None and isinstance(key, tuple):
                    self._done[key] = outcomes[i]

    def clear(self) -> None:
        with self._lock:
            self._done.clear()

    def __len__(self) -> int:
        return len(self._done)
