"""`slime.rollout.filter_hub.dynamic_sampling_filters`: slime-wf's built-in filters (the same two)."""

from slime_wf.rollout.filter_hub.dynamic_sampling_filters import (
    check_reward_nonzero_std,
    check_reward_nonzero_std_with_fallback,
)

__all__ = ["check_reward_nonzero_std", "check_reward_nonzero_std_with_fallback"]
