"""`slime.rollout.rm_hub.math_dapo_utils`: slime-wf's `slime_wf.rollout.rm_hub.math_dapo_utils`."""

from slime_wf.rollout.rm_hub.math_dapo_utils import *  # noqa: F403
from slime_wf.rollout.rm_hub.math_dapo_utils import __all__ as __all__
