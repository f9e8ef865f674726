"""Dynamic-sampling filters: keep or drop a whole group after it has been rewarded.

A filter is loaded from `dynamic_sampling_filter_path` and called as
`filter(args, samples, **kwargs)`; it returns a `DynamicFilterOutput`, anything of that shape
(`keep` as a bool or 0-d tensor, optional `reason` and `keep_when_insufficient`: slime's own class,
a dict), or, as older slime filters do, a plain bool meaning keep. `call_dynamic_filter` normalizes
each, `should_drop_dynamic_filter_output` applies `keep_when_insufficient`, and `DropReasonCounter`
turns the drops into `filter/drop_<reason>` metrics.
"""

from .base_types import (
    DropReasonCounter,
    DynamicFilterOutput,
    FilterError,
    as_filter_output,
    call_dynamic_filter,
    load_dynamic_filter,
    should_drop_dynamic_filter_output,
)
from .dynamic_sampling_filters import check_reward_nonzero_std, check_reward_nonzero_std_with_fallback

__all__ = [
    "DropReasonCounter",
    "DynamicFilterOutput",
    "FilterError",
    "as_filter_output",
    "call_dynamic_filter",
    "check_reward_nonzero_std",
    "check_reward_nonzero_std_with_fallback",
    "load_dynamic_filter",
    "should_drop_dynamic_filter_output",
]
