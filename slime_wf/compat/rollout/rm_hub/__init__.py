"""`slime.rollout.rm_hub`: reward entry points and graders, as slime's plugins import them.

`async_rm` / `batched_async_rm` / `remote_rm` use the reward hub of the rollout in progress (its worker
pool, cache, time limits and counters). slime's gpqa and ifbench graders are not here.
"""

from slime_wf.rollout.rm_hub import async_rm, batched_async_rm, remote_rm
from slime_wf.rollout.rm_hub.deepscaler import get_deepscaler_rule_based_reward
from slime_wf.rollout.rm_hub.f1 import f1_score
from slime_wf.rollout.rm_hub.math_dapo_utils import compute_score as compute_score_dapo
from slime_wf.rollout.rm_hub.math_utils import extract_answer as extract_boxed_answer
from slime_wf.rollout.rm_hub.math_utils import grade_answer_verl

from . import deepscaler, f1, math_dapo_utils, math_utils

__all__ = [
    "async_rm",
    "batched_async_rm",
    "compute_score_dapo",
    "deepscaler",
    "extract_boxed_answer",
    "f1",
    "f1_score",
    "get_deepscaler_rule_based_reward",
    "grade_answer_verl",
    "math_dapo_utils",
    "math_utils",
    "remote_rm",
]
