"""The filter contract: its output type, how a filter is loaded and called, and drop metrics."""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from slime_wf.plugins import load_function


class FilterError(TypeError):
    """A filter returned something other than a DynamicFilterOutput or a bool."""


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


def call_dynamic_filter(
    fn: Callable[..., Any] | None, args: Any, samples: list[Any], *, path: str | None = None, **kwargs: Any
) -> DynamicFilterOutput:
    """Call a filter (None keeps everything) and return its verdict as a DynamicFilterOutput.

    A bool is taken as `keep` (slime's older filters return one); anything else raises
    FilterError naming the filter (`path`, or the function's own name).
    """
    if fn is None:
        return DynamicFilterOutput(keep=True)
    output = fn(args, samples, **kwargs)
    if isinstance(output, DynamicFilterOutput):
        output.keep = bool(_plain(output.keep))  # slime's own filters put a torch bool here
        return output
    output = _plain(output)
    if isinstance(output, bool):
        return DynamicFilterOutput(keep=output)
    raise FilterError(
        f"dynamic sampling filter {_name(fn, path)!r} returned {type(output).__name__} {str(output)[:100]!r}; "
        "it must return a DynamicFilterOutput (slime_wf.rollout.filter_hub.DynamicFilterOutput) or a bool"
    )


class DropReasonCounter:
    """Counts dropped groups by reason, as `rollout/dynamic_filter/drop_<reason>` metrics.

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
        return {
            f"rollout/dynamic_filter/drop_{reason}": float(n) for reason, n in sorted(self._drops.items())
        }

    def reset(self) -> None:
        self._drops.clear()
