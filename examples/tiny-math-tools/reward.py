"""The reward of the calculator environment, written as a slime plugin (custom_rm_path).

1 for a right first answer, 0.5 for an answer put right after the calculator's result, 0 otherwise:
the policy learns to read the tool's result, and that answering right at once is worth more.
"""

from slime.rollout.rm_hub import grade_answer_verl
from slime.utils.types import Sample


async def reward_func(args, sample, **kwargs):
    if not isinstance(sample, Sample):
        raise TypeError("Sample must be an instance of Sample class.")
    if not grade_answer_verl(sample.response, sample.label):
        return 0.0
    return 1.0 if sample.metadata.get("turns", 1) == 1 else 0.5
