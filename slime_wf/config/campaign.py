"""`CampaignConfig`: the whole campaign, its checks across sections, loading and the flat view."""

from __future__ import annotations

import argparse
import hashlib
import json
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from slime_wf.redact import redact_urls_in

from .base import ConfigError, format_validation_error
from .checks import check_train_settings
from .loading import checked_data, read_yaml
from .sections import (
    SECTIONS,
    BufferConfig,
    DataConfig,
    EngineConfig,
    EvalConfig,
    FilterConfig,
    ModelConfig,
    RewardConfig,
    RolloutConfig,
    StorageConfig,
    TrackingConfig,
)
from .train import CheckpointConfig, TrainConfig


class CampaignConfig(BaseModel):
    """One RL campaign: what to train, on what, and where its run store lives."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, title="Campaign")

    campaign: str = Field(
        "default",
        pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$",
        description="Campaign name: the run store folder (lowercase letters, digits, - and _).",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _consistent(self) -> CampaignConfig:
        ro = self.rollout
        if ro.over_sampling_batch_size is not None and ro.over_sampling_batch_size < ro.rollout_batch_size:
            raise ValueError(
                f"rollout.over_sampling_batch_size={ro.over_sampling_batch_size} is smaller than "
                f"rollout.rollout_batch_size={ro.rollout_batch_size}; allowed: >= rollout_batch_size, or null"
            )
        if ro.train_async and ro.max_weight_staleness == 0:
            raise ValueError(
                "rollout.train_async generates each rollout with the policy one version behind the one that trains "
                "on it, so rollout.max_weight_staleness=0 would regenerate everything; set it to 1 or more, or null"
            )
        if self.reward.rm_type == "remote_rm" and not self.reward.rm_url:
            raise ValueError("reward.rm_type=remote_rm needs reward.rm_url (the URL of the reward server)")
        return self

    @model_validator(mode="after")
    def _train_consistent(self) -> CampaignConfig:
        check_train_settings(
            self.train,
            self.rollout.rollout_batch_size,
            self.rollout.n_samples_per_prompt,
            self.rollout.num_rollout,
        )
        return self

    # ---- loading -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, overrides: list[str] | None = None) -> CampaignConfig:
        data = checked_data(data, overrides)
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err)) from None

    @classmethod
    def from_yaml(cls, path: str, overrides: list[str] | None = None) -> CampaignConfig:
        data = read_yaml(path)
        try:
            return cls.from_dict(data, overrides)
        except ConfigError as err:
            raise ConfigError(f"campaign config {path}: {err}") from None

    def to_yaml(self, *, redact: bool = True) -> str:
        """The config as YAML. With `redact` (for config.yaml, logs and printing), credentials inside
        URLs are masked (see `slime_wf.redact`), so the text cannot be loaded back as a working config."""
        data = self.model_dump(mode="json")
        return yaml.safe_dump(redact_urls_in(data) if redact else data, sort_keys=False)

    def config_hash(self) -> str:
        """A short, stable hash of the settings (to notice a config change on resume)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    # ---- the flat view plugins get --------------------------------------------------------

    def args(self) -> argparse.Namespace:
        """Every leaf as a flat attribute, as slime's plugins expect (`args.n_samples_per_prompt`)."""
        flat: dict[str, Any] = {"campaign": self.campaign}
        for name in SECTIONS:
            flat.update(getattr(self, name).model_dump())
        return argparse.Namespace(**flat)
