"""`slime.utils.misc`: loading a function by dotted path, the singleton metaclass, small helpers."""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from slime_wf import plugins
from slime_wf._sample_meta import decode_int32_meta_array


@functools.cache
def load_function(path: str) -> Callable[..., Any]:
    """The callable at `path` ("pkg.mod.func" or "pkg.mod:func"); errors name the path and the fix.
    Cached per path, as slime's is."""
    return plugins.load_function(path)


class SingletonMeta(type):
    """Classes whose every call returns the first instance (per process), as slime's."""

    _instances: dict[type, Any] = {}

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls not in cls._instances:
            cls._instances[cls] = super().__call__(*args, **kwargs)
        return cls._instances[cls]

    def clear_instances(cls) -> None:
        cls._instances = {}


def group_by(iterable: Iterable[Any], key: Callable[[Any], Any] | None = None) -> dict[Any, list[Any]]:
    """Like itertools.groupby, without needing sorted input."""
    out: dict[Any, list[Any]] = defaultdict(list)
    for item in iterable:
        out[key(item) if key is not None else item].append(item)
    return dict(out)


def should_run_periodic_action(
    rollout_id: int,
    interval: int | None,
    num_rollout_per_epoch: int | None = None,
    num_rollout: int | None = None,
) -> bool:
    """Whether an every-`interval` action (eval, save) runs after `rollout_id` (the last one always)."""
    if interval is None:
        return False
    if num_rollout is not None and rollout_id == num_rollout - 1:
        return True
    step = rollout_id + 1
    return step % interval == 0 or (num_rollout_per_epoch is not None and step % num_rollout_per_epoch == 0)


__all__ = [
    "SingletonMeta",
    "decode_int32_meta_array",
    "group_by",
    "load_function",
    "should_run_periodic_action",
]
