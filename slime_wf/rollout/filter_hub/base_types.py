"""The filter contract: its output type, how a filter is loaded and called, and drop metrics."""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from slime_wf.plugins import load_function


class FilterError(TypeError):
    """A filter returned something that is neither a bool nor has a `keep`."""


@dataclass
class DynamicFilterOutput:
    """A filter's verdict on one group.

    keep: train on the group. reason: why it was dropped (becomes a metric name).
    keep_when_insufficient: a dropped group that may still fill the batch when too few groups
    were kept, instead of starting another sampling round.
    """

    keep: bool
    reason: str | None = None
    keep_when_insufficient: bool = False


def should_drop_dynamic_filter_output(
    output: DynamicFilterOutput, *, remaining_batch_size: int, target_data_size: int
) -> bool:
    """Whether the rollout drops the group.

    remaining_batch_size: groups still able to enter the batch (kept, plus in flight, plus this
    one); target_data_size: the groups the batch needs. A rejected group marked
    keep_when_insufficient stays when dropping it would leave the batch short, so that no
    further sampling round is started for it.
    """
    if output.keep:
        return False
    return not (output.keep_when_insufficient and remaining_batch_size <= target_data_size)


def load_dynamic_filter(path: str | None) -> Callable[..., Any] | None:
    """The filter at `path` (called as `filter(args, samples, **kwargs)`), or None for keep-all."""
    if not path:
        return None
    return load_function(path, num_positional=2, kind="dynamic sampling filter")


def _name(fn: Callable[..., Any], path: str | None) -> str:
    return path or f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _plain(value: Any) -> Any:
    """numpy / torch scalar booleans as Python bools (they are not bool subclasses)."""
    if not isinstance(value, bool) and hasattr(value, "item") and getattr(value, "shape", None) == ():
        value = value.item()
    return value


def as_filter_output(output: Any, name: str) -> DynamicFilterOutput:
    """A filter's result read by its shape, not its class: anything with `keep` (a bool or a 0-d
    tensor/array), optional `reason` and `keep_when_insufficient` (an attribute or a mapping key), or a
    plain bool meaning keep. So slime's own `DynamicFilterOutput`, a plugin's dataclass and a dict all
    work. Anything else raises FilterError naming the filter (`name`)."""
    value = _plain(output)
    if isinstance(value, bool):
        return DynamicFilterOutput(keep=value)

    def part(key: str, default: Any) -> Any:
        if isinstance(output, Mapping):
            return output.get(key, default)
        return getattr(output, key, default)

    has_keep = ("keep" in output) if isinstance(output, Mapping) else hasattr(output, "keep")
    if not has_keep:
        raise FilterError(
            f"dynamic sampling filter {name!r} returned {type(output).__name__} {str(output)[:100]!r}; it must "
            "return a bool, or something with `keep` (a bool or a 0-d tensor) and optionally `reason` and "
            "`keep_when_insufficient`, such as slime_wf.rollout.filter_hub.DynamicFilterOutput"
        )
    keep = _plain(part("keep", None))
    fallback = _plain(part("keep_when_insufficient", False))
    reason = part("reason", None)
    if not isinstance(keep, bool):
        raise FilterError(
            f"dynamic sampling filter {name!r} returned keep={keep!r} ({type(keep).__name__}); keep must be a "
            "bool or a 0-d tensor/array holding one"
        )
    if not isinstance(fallback, bool):
        raise FilterError(
            f"dynamic sampling filter {name!r} returned keep_when_insufficient={fallback!r}; it must be a bool"
        )
    if reason is not None and not isinstance(reason, str):
        raise FilterError(
            f"dynamic sampling filter {name!r} returned reason={reason!r}; it must be a str or None"
        )
    return DynamicFilterOutput(keep=keep, reason=reason, keep_when_insufficient=fallback)


def call_dynamic_filter(
    fn: Callable[..., Any] | None, args: Any, samples: list[Any], *, path: str | None = None, **kwargs: Any
) -> DynamicFilterOutput:
    """Call a filter (None keeps everything) and return its verdict as a DynamicFilterOutput, read by
    shape (`as_filter_output`); a result of another shape raises FilterError naming the filter (`path`,
    or the function's own name)."""
    if fn is None:
        return DynamicFilterOutput(keep=True)
    return as_filter_output(fn(args, samples, **kwargs), _name(fn, path))


class DropReasonCounter:
    """Counts dropped groups by reason, as `filter/drop_<reason>` metrics.

    The filter's verdicts come in through `add`; the rollout loop's own drops (failed, aborted,
    surplus groups) through `drop`, so that every reason shares one metric family."""

    def __init__(self) -> None:
        self._drops: collections.Counter[str] = collections.Counter()

    def add(self, output: DynamicFilterOutput) -> None:
        if not output.keep:
            self.drop(output.reason or "unspecified")

    def drop(self, reason: str) -> None:
        self._drops[reason] += 1

    def counts(self) -> dict[str, int]:
        """Drops per reason, the most frequent first."""
        return dict(self._drops.most_common())

    def metrics(self) -> dict[str, float]:
        return {f"filter/drop_{reason}": float(n) for reason, n in sorted(self._drops.items())}

    def reset(self) -> None:
        self._drops.clear()
