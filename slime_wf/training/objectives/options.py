"""The objective options (slime's flag names), their slime defaults, and their validation.

The objectives read `args.<flag>` like slime does. A namespace that lacks an option gets slime's
default, so the functions work on any `argparse.Namespace` (a campaign's `cfg.args()`, a test's
`Namespace(...)`); a present option is validated here once, with a message that names the option,
the value and what is allowed.
"""

from __future__ import annotations

import argparse
from typing import Any

ADVANTAGE_ESTIMATORS = ("grpo", "gspo", "cispo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "ppo")
KL_LOSS_TYPES = ("k1", "k2", "k3", "low_var_kl")
LOSS_TYPES = ("policy_loss", "value_loss", "sft_loss", "custom_loss")

OBJECTIVE_OPTIONS: dict[str, tuple[Any, str]] = {
    "advantage_estimator": ("grpo", f"Advantage estimator, one of {ADVANTAGE_ESTIMATORS}."),
    "rewards_normalization": (
        True,
        "Subtract each group's mean reward (grpo, gspo, cispo, reinforce_plus_plus_baseline).",
    ),
    "grpo_std_normalization": (
        True,
        "Also divide by the group's (unbiased) reward std + 1e-6 (grpo, gspo, cispo); false is Dr.GRPO.",
    ),
    "normalize_advantages": (
        False,
        "Whiten advantages over all loss-masked tokens of the batch (required by reinforce_plus_plus*).",
    ),
    "kl_coef": (0.0, "Per-token KL(actor||ref) penalty folded into the rewards before the advantages."),
    "kl_loss_type": ("k1", f"KL estimator for the reward penalty and the KL loss, one of {KL_LOSS_TYPES}."),
    "use_kl_loss": (False, "Add kl_loss_coef * KL(actor||ref) to the loss (GRPO's KL term)."),
    "kl_loss_coef": (0.0, "Weight of the KL loss term."),
    "use_unbiased_kl": (False, "Weight the KL loss by the importance ratio pi/pi_old (DeepSeek-V3.2)."),
    "entropy_coef": (0.0, "Weight of the entropy bonus (subtracted from the loss)."),
    "eps_clip": (0.2, "PPO clip: the ratio is clipped below at 1 - eps_clip."),
    "eps_clip_high": (None, "PPO clip above at 1 + eps_clip_high (DAPO clip-higher). null: eps_clip."),
    "eps_clip_c": (None, "Dual-clip PPO bound (> 1) on the loss of negative-advantage tokens. null: off."),
    "value_clip": (0.2, "Clip of the value update around the old values (value loss)."),
    "gamma": (1.0, "Discount factor (ppo GAE, reinforce_plus_plus)."),
    "lambd": (1.0, "GAE lambda (ppo)."),
    "calculate_per_token_loss": (
        False,
        "Average the loss over all tokens of the step instead of per sample, then over samples.",
    ),
    "use_tis": (False, "Truncated importance sampling between the trainer's and the engine's log-probs."),
    "tis_clip": (2.0, "Upper clamp of the TIS weight."),
    "tis_clip_low": (0.0, "Lower clamp of the TIS weight."),
    "use_rollout_logprobs": (False, "Use the engine's log-probs as the old policy in the ratio and the KL."),
    "loss_type": ("policy_loss", f"Loss, one of {LOSS_TYPES}."),
    "custom_loss_function_path": (
        None,
        "Dotted path of a loss (args, batch, logits, sum_of_sample_mean) -> (loss, metrics) for custom_loss.",
    ),
    "rollout_temperature": (1.0, "Sampling temperature: log-probs are taken of softmax(logits / T)."),
    "log_probs_chunk_size": (
        -1, "Rows per chunk when computing log-probs from logits; -1: automatic (2^26 float32 values)."
    ),
}


class ObjectiveConfigError(ValueError):
    """An objective option with a value the objectives cannot use."""


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ObjectiveConfigError(f"objective option {name}={value!r} is not usable: {allowed}")


def resolve_objective_args(args: Any = None, **overrides: Any) -> argparse.Namespace:
    """A new namespace: every attribute of `args`, the missing objective options at slime's
    defaults, `overrides` on top; validated, with `eps_clip_high` resolved (null means eps_clip)."""
    if args is None:
        values: dict[str, Any] = {}
    elif isinstance(args, dict):
        values = dict(args)
    else:
        try:
            values = dict(vars(args))
        except TypeError:
            values = {name: getattr(args, name) for name in OBJECTIVE_OPTIONS if hasattr(args, name)}
    values.update(overrides)
    for name, (default, _) in OBJECTIVE_OPTIONS.items():
        values.setdefault(name, default)
    ns = argparse.Namespace(**values)

    if ns.advantage_estimator not in ADVANTAGE_ESTIMATORS:
        _fail("advantage_estimator", ns.advantage_estimator, f"choose one of {ADVANTAGE_ESTIMATORS}")
    if ns.kl_loss_type not in KL_LOSS_TYPES:
        _fail("kl_loss_type", ns.kl_loss_type, f"choose one of {KL_LOSS_TYPES}")
    if ns.loss_type not in LOSS_TYPES:
        _fail("loss_type", ns.loss_type, f"choose one of {LOSS_TYPES}")
    if ns.loss_type == "custom_loss" and not ns.custom_loss_function_path:
        _fail("custom_loss_function_path", ns.custom_loss_function_path, "loss_type custom_loss needs a dotted path")
    if ns.eps_clip is None or ns.eps_clip < 0:
        _fail("eps_clip", ns.eps_clip, "must be a number >= 0")
    if ns.eps_clip_high is None:
        ns.eps_clip_high = ns.eps_clip
    if ns.eps_clip_high < 0:
        _fail("eps_clip_high", ns.eps_clip_high, "must be >= 0 (or null for eps_clip)")
    if ns.eps_clip_c is not None and not ns.eps_clip_c > 1.0:
        _fail("eps_clip_c", ns.eps_clip_c, "dual-clip PPO needs a bound > 1 (e.g. 3.0), or null to turn it off")
    if ns.tis_clip is None or ns.tis_clip_low is None or ns.tis_clip < ns.tis_clip_low:
        _fail("tis_clip", (ns.tis_clip_low, ns.tis_clip), "needs 0 <= tis_clip_low <= tis_clip")
    if ns.tis_clip_low < 0:
        _fail("tis_clip_low", ns.tis_clip_low, "must be >= 0")
    if ns.value_clip is None or ns.value_clip < 0:
        _fail("value_clip", ns.value_clip, "must be >= 0")
    if not 0.0 <= ns.gamma <= 1.0:
        _fail("gamma", ns.gamma, "must lie in [0, 1]")
    if not 0.0 <= ns.lambd <= 1.0:
        _fail("lambd", ns.lambd, "must lie in [0, 1]")
    if ns.advantage_estimator.startswith("reinforce_plus_plus") and not ns.normalize_advantages:
        # slime refuses this combination too: without whitening the returns carry the raw reward scale.
        _fail(
            "normalize_advantages",
            ns.normalize_advantages,
            f"advantage_estimator {ns.advantage_estimator} requires normalize_advantages: true",
        )
    if ns.rollout_temperature is not None and ns.rollout_temperature < 0:
        _fail("rollout_temperature", ns.rollout_temperature, "must be >= 0 (0 means greedy, read as 1)")
    return ns
