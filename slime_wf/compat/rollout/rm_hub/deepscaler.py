"""`slime.rollout.rm_hub.deepscaler`: slime-wf's `slime_wf.rollout.rm_hub.deepscaler`."""

from slime_wf.rollout.rm_hub.deepscaler import *  # noqa: F403
from slime_wf.rollout.rm_hub.deepscaler import __all__ as __all__
