"""The objective options, defined once: slime's flag names, defaults, meaning and checks.

`ObjectiveFields` declares them, and both of their users are built on it:

- the train section (`TrainConfig`), so a campaign file, the README reference and the
  validation of a campaign read these very fields;
- `ObjectiveOptions`, the frozen object the losses and advantages take: the same fields plus
  `rollout_temperature` (a rollout setting, declared here and used by the rollout section).
  The trainer resolves it once (`ObjectiveOptions.from_args`) and passes it down, so nothing is
  checked again per micro-batch.

A bad value gets the same message from a campaign file as from `from_args`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, get_args

from pydantic import ConfigDict, Field, ValidationError, model_validator

from .base import ConfigError, Section, format_validation_error

AdvantageEstimator = Literal[
    "grpo", "gspo", "cispo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "ppo"
]
KlLossType = Literal["k1", "k2", "k3", "low_var_kl"]
LossType = Literal["policy_loss", "value_loss", "sft_loss", "custom_loss"]
ADVANTAGE_ESTIMATORS: tuple[str, ...] = get_args(AdvantageEstimator)
KL_LOSS_TYPES: tuple[str, ...] = get_args(KlLossType)
LOSS_TYPES: tuple[str, ...] = get_args(LossType)

# The objectives take log-probs of softmax(logits / T) with the rollout's temperature (0, greedy, reads as 1).
ROLLOUT_TEMPERATURE = Field(1.0, ge=0, description="Sampling temperature (0: greedy).")


class ObjectiveConfigError(ConfigError):
    """Objective options the objectives cannot use; the message names each option, its value and
    what is allowed."""


class ObjectiveFields(Section):
    """The objective options of the train section (rollout_temperature, which the objectives also
    read, is a rollout setting)."""

    advantage_estimator: AdvantageEstimator = Field(
        "grpo",
        description="Advantage estimator. ppo: GAE over the values of a critic the trainer builds "
        "(a value-head copy of the policy, trained with the clipped value loss; see critic_*).",
    )
    rewards_normalization: bool = Field(
        True,
        description="Subtract each group's mean reward (grpo, gspo, cispo, reinforce_plus_plus_baseline).",
    )
    grpo_std_normalization: bool = Field(
        True,
        description="Also divide by the group's (unbiased) reward std + 1e-6 (grpo, gspo, cispo); false is Dr.GRPO.",
    )
    normalize_advantages: bool = Field(
        False,
        description="Whiten advantages over all loss-masked tokens of the batch (required by reinforce_plus_plus*).",
    )
    kl_coef: float = Field(
        0.0, description="Per-token KL(actor||ref) penalty folded into the rewards before the advantages."
    )
    kl_loss_type: KlLossType = Field("k1", description="KL estimator for the reward penalty and the KL loss.")
    use_kl_loss: bool = Field(
        False, description="Add kl_loss_coef * KL(actor||ref) to the loss (GRPO's KL term)."
    )
    kl_loss_coef: float = Field(0.0, description="Weight of the KL loss term.")
    use_unbiased_kl: bool = Field(
        False, description="Weight the KL loss by the importance ratio pi/pi_old (DeepSeek-V3.2)."
    )
    entropy_coef: float = Field(0.0, description="Weight of the entropy bonus (subtracted from the loss).")
    eps_clip: float = Field(0.2, ge=0, description="PPO clip: the ratio is clipped below at 1 - eps_clip.")
    eps_clip_high: float | None = Field(
        None, ge=0, description="PPO clip above at 1 + eps_clip_high (DAPO clip-higher). null: eps_clip."
    )
    eps_clip_c: float | None = Field(
        None,
        gt=1,
        description="Dual-clip PPO bound (> 1) on the loss of negative-advantage tokens. null: off.",
    )
    value_clip: float = Field(
        0.2, ge=0, description="Clip of the value update around the old values (value loss)."
    )
    gamma: float = Field(1.0, ge=0, le=1, description="Discount factor (ppo GAE, reinforce_plus_plus).")
    lambd: float = Field(1.0, ge=0, le=1, description="GAE lambda (ppo).")
    calculate_per_token_loss: bool = Field(
        False,
        description="Average the loss over all tokens of the step instead of per sample, then over samples.",
    )
    use_tis: bool = Field(
        False, description="Truncated importance sampling between the trainer's and the engine's log-probs."
    )
    tis_clip: float = Field(2.0, ge=0, description="Upper clamp of the TIS weight.")
    tis_clip_low: float = Field(0.0, ge=0, description="Lower clamp of the TIS weight.")
    use_rollout_logprobs: bool = Field(
        False, description="Use the engine's log-probs as the old policy in the ratio and the KL."
    )
    loss_type: LossType = Field(
        "policy_loss",
        description="The policy's loss. value_loss is the critic's, which ppo trains on its own.",
    )
    custom_loss_function_path: str | None = Field(
        None,
        description="Dotted path of a loss (args, batch, logits, sum_of_sample_mean) -> (loss, metrics) for custom_loss.",
    )
    log_probs_chunk_size: int = Field(
        -1,
        description="Rows per chunk when computing log-probs from logits; -1: automatic (about 2^18 float32 values per chunk on a CPU, cache-sized, and 2^26 on a GPU; at least 16 rows).",
    )

    @model_validator(mode="after")
    def _objective_consistent(self) -> ObjectiveFields:
        estimator = self.advantage_estimator
        if estimator.startswith("reinforce_plus_plus") and not self.normalize_advantages:
            # slime refuses this combination too: without whitening the returns carry the raw reward scale.
            raise ValueError(f"advantage_estimator={estimator} requires normalize_advantages: true")
        if self.loss_type == "custom_loss" and not self.custom_loss_function_path:
            raise ValueError("loss_type=custom_loss needs custom_loss_function_path (the loss's dotted path)")
        if self.tis_clip_low > self.tis_clip:
            raise ValueError(
                f"tis_clip_low={self.tis_clip_low} is above tis_clip={self.tis_clip}: "
                "the TIS weight is clamped to [tis_clip_low, tis_clip]"
            )
        return self


class ObjectiveOptions(ObjectiveFields):
    """The objective options as the losses and advantages take them: frozen, checked, and with
    eps_clip_high resolved (null means eps_clip). The attributes are slime's flag names, so code
    written against slime's `args` reads them unchanged."""

    model_config = ConfigDict(frozen=True)

    rollout_temperature: float = ROLLOUT_TEMPERATURE

    @model_validator(mode="after")
    def _resolve_eps_clip_high(self) -> ObjectiveOptions:
        if self.eps_clip_high is None:
            object.__setattr__(self, "eps_clip_high", self.eps_clip)  # the one write, before anyone reads it
        return self

    @classmethod
    def from_args(cls, args: Any = None, **overrides: Any) -> ObjectiveOptions:
        """The objective options of `args`: a namespace (a campaign's `cfg.args()`, a test's
        `Namespace(...)`), a mapping, or any object with the options as attributes; an option it
        lacks takes its default, `overrides` go on top. Already resolved options (and no
        overrides) come back as they are. Raises `ObjectiveConfigError`."""
        if isinstance(args, cls) and not overrides:
            return args
        if args is None:
            values: dict[str, Any] = {}
        elif isinstance(args, Mapping):
            values = {name: args[name] for name in cls.model_fields if name in args}
        else:
            values = {name: getattr(args, name) for name in cls.model_fields if hasattr(args, name)}
        values.update(overrides)
        try:
            return cls.model_validate(values)
        except ValidationError as err:
            raise ObjectiveConfigError(format_validation_error(err, "objective options")) from None
