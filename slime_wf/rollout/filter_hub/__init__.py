"""Dynamic-sampling filters: keep or drop a whole group after it has been rewarded.

A filter is loaded from `dynamic_sampling_filter_path` and called as
`filter(args, samples, **kwargs)`; it returns a `DynamicFilterOutput` (or, as older slime
filters do, a plain bool meaning keep). `call_dynamic_filter` normalizes either, and
`should_drop_dynamic_filter_output` applies `keep_when_insufficient`, and `DropReasonCounter`
turns the drops into `rollout/dynamic_filter/drop_<reason>` metrics.
"""

from .base_types import (
    DropReasonCounter,
    DynamicFilterOutput,
    FilterError,
    call_dynamic_filter,
    load_dynamic_filter,
    should_drop_dynamic_filter_output,
)
from .dynamic_sampling_filters import check_reward_nonzero_std, check_reward_nonzero_std_with_fallback

__all__ = [
    "DropReasonCounter",
    "DynamicFilterOutput",
    "FilterError",
    "call_dynamic_filter",
    "check_reward_nonzero_std",
    "check_reward_nonzero_std_with_fallback",
    "load_dynamic_filter",
    "should_drop_dynamic_filter_output",
]
