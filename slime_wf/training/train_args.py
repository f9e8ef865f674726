"""The trainer's settings: a flat namespace (slime's flag names) completed, validated and derived.

The trainer reads `args.<flag>` like slime. `resolve_train_args` accepts a campaign's `cfg.args()`
or any partial namespace / dict (a test's), fills every missing leaf with the campaign
config's default, validates the lot through `CampaignConfig` (so a bad value gets the same
message as in a campaign file), resolves the objective options, and adds the derived values:
`global_batch_size`, `num_steps_per_rollout` and `lr_decay_iters` are never null afterwards.
Attributes that are no config leaf (a plugin's own flags) pass through untouched.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from slime_wf.checkpoint.dtypes import torch_dtype
from slime_wf.training import cpu_shim


def resolve_train_args(args: Any = None, **overrides: Any) -> argparse.Namespace:
    """A complete, validated namespace for the trainer (see the module docstring)."""
    from slime_wf.config import CampaignConfig, ConfigError, leaf_sections, resolve_batch_sizes
    from slime_wf.training.objectives import resolve_objective_args

    if args is None:
        values: dict[str, Any] = {}
    elif isinstance(args, dict):
        values = dict(args)
    else:
        values = dict(vars(args))
    values.update(overrides)
    leaves = leaf_sections()
    sections: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        if name in leaves:
            sections.setdefault(leaves[name], {})[name] = value
    if "campaign" in values:
        sections["campaign"] = values["campaign"]
    try:
        cfg = CampaignConfig.from_dict(sections)
    except ConfigError as err:
        raise ConfigError(f"trainer settings: {err}") from None
    flat = {**values, **vars(cfg.args())}
    ns = resolve_objective_args(flat)
    ns.global_batch_size, ns.num_steps_per_rollout = resolve_batch_sizes(
        ns.rollout_batch_size, ns.n_samples_per_prompt, ns.global_batch_size, ns.num_steps_per_rollout
    )
    ns.lr_decay_iters = ns.lr_decay_iters or max(ns.num_rollout * ns.num_steps_per_rollout, 1)
    return ns


def params_dtype(args: Any) -> torch.dtype:
    """The torch dtype of `args.params_dtype` ("auto": bfloat16 with CUDA, float32 on CPU)."""
    auto = torch.float32 if cpu_shim.is_active() else torch.bfloat16
    return torch_dtype(
        getattr(args, "params_dtype", "auto"), "params_dtype", choices=("float32", "bfloat16"), auto=auto
    )


def needs_critic(args: Any) -> bool:
    """PPO's advantages come from the critic's values (GAE)."""
    return getattr(args, "advantage_estimator", None) == "ppo"


def needs_reference_model(args: Any) -> bool:
    """A KL term reads the reference model's log-probs: the KL loss, or the KL reward penalty
    of the estimators that use it (grpo, gspo and cispo ignore kl_coef, as in slime)."""
    penalty = args.kl_coef != 0 and args.advantage_estimator in (
        "reinforce_plus_plus",
        "reinforce_plus_plus_baseline",
    )
    return bool(args.use_kl_loss or penalty)


def needs_old_log_probs(args: Any, num_steps: int) -> bool:
    """Whether the trainer must score the rollout with the policy before its first step.

    With one step per rollout the policy of the step is the one that generated the data, so
    the loss uses the current log-probs (detached) as the old ones, as slime does; the engine's
    log-probs stand in with use_rollout_logprobs. A KL reward penalty reads them before any step.
    """
    if args.use_rollout_logprobs:
        return False
    penalty = args.kl_coef != 0 and args.advantage_estimator in (
        "reinforce_plus_plus",
        "reinforce_plus_plus_baseline",
    )
    return num_steps > 1 or penalty
