"""slime's RL objectives as plain torch functions: log-probs from logits, advantages and returns,
per-token losses, slime's reductions, and the per-micro-batch loss entry point.

Nothing here knows about Megatron: inputs are tensors and per-sample lists of tensors, so the
objectives serve any model that produces logits (or log-probs) over a micro-batch. Their
settings are `ObjectiveOptions` (slime's flag names, defined with the campaign config), resolved
once and passed in as `args`.
"""

from .advantages import (
    broadcast_to_tokens,
    compute_advantages_and_returns,
    compute_gae,
    group_normalize,
    masked_whiten,
    post_process_rewards,
    ppo_token_rewards,
    reinforce_plus_plus_baseline_advantages,
    reinforce_plus_plus_returns,
    resolve_group_sizes,
)
from .logprobs import (
    gather_log_probs_and_entropy,
    normalize_temperature,
    per_sample_tokens,
    response_log_probs_and_entropy,
    slice_responses,
    token_log_probs_and_entropy,
)
from .loss_functions import (
    PolicyOutputs,
    compute_policy_outputs,
    loss_function,
    policy_loss_function,
    sft_loss_function,
    value_loss_function,
)
from .losses import (
    cispo_loss,
    compute_approx_kl,
    policy_loss,
    sequence_mean_ppo_kl,
    tis_weights,
    value_loss,
)
from .options import (
    ADVANTAGE_ESTIMATORS,
    KL_LOSS_TYPES,
    LOSS_TYPES,
    ObjectiveConfigError,
    ObjectiveOptions,
    resolve_objective_args,
)
from .reduction import get_sum_of_sample_mean, make_reducer, step_normalizer

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "KL_LOSS_TYPES",
    "LOSS_TYPES",
    "ObjectiveConfigError",
    "ObjectiveOptions",
    "PolicyOutputs",
    "broadcast_to_tokens",
    "cispo_loss",
    "compute_advantages_and_returns",
    "compute_approx_kl",
    "compute_gae",
    "compute_policy_outputs",
    "gather_log_probs_and_entropy",
    "get_sum_of_sample_mean",
    "group_normalize",
    "loss_function",
    "make_reducer",
    "masked_whiten",
    "normalize_temperature",
    "per_sample_tokens",
    "policy_loss",
    "policy_loss_function",
    "post_process_rewards",
    "ppo_token_rewards",
    "reinforce_plus_plus_baseline_advantages",
    "reinforce_plus_plus_returns",
    "resolve_group_sizes",
    "resolve_objective_args",
    "response_log_probs_and_entropy",
    "sequence_mean_ppo_kl",
    "sft_loss_function",
    "slice_responses",
    "step_normalizer",
    "tis_weights",
    "token_log_probs_and_entropy",
    "value_loss",
    "value_loss_function",
]
