"""`slime.rollout.rm_hub.f1`: slime-wf's `slime_wf.rollout.rm_hub.f1`."""

from slime_wf.rollout.rm_hub.f1 import *  # noqa: F403
from slime_wf.rollout.rm_hub.f1 import __all__ as __all__
