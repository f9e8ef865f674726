"""`slime.rollout.filter_hub`: dynamic-sampling filters and their output type."""

from . import base_types, dynamic_sampling_filters

__all__ = ["base_types", "dynamic_sampling_filters"]
