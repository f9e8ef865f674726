"""The campaign configuration: pydantic models loaded from YAML.

A campaign file has one mapping per section (`model`, `data`, `rollout`, `engine`, `eval`,
`reward`, `filter`, `buffer`, `train`, `checkpoint`, `storage`) plus the campaign's name. Leaf
names follow slime's command-line flags in snake_case and are unique across sections, so that:

- plugins get a flat `args` namespace (`args.n_samples_per_prompt`, `args.reward_key`), exactly
  what slime's plugins read;
- an override may name a leaf alone (`rollout_batch_size=16`) or with its section
  (`rollout.rollout_batch_size=16`).

Unknown keys and bad values raise `ConfigError`, which names the key, the value and what is
allowed. `python -m slime_wf.config` prints the configuration reference that README.md embeds.

The rooms, each importing only the ones above it:

- `base`: the section base model, `ConfigError`, the text of a validation error;
- `objective`: the objective options, defined once (the train section's first fields, and the
  frozen `ObjectiveOptions` the losses and advantages take);
- `train`, `sections`: the section models, and `SECTIONS`;
- `checks`: checks across sections (batch sizes, the trainer's settings);
- `loading`: YAML, key checking with close matches, overrides;
- `campaign`: `CampaignConfig`;
- `reference`: the README's configuration reference.
"""

from .base import ConfigError, Section, format_validation_error
from .campaign import CampaignConfig
from .checks import check_train_settings, resolve_batch_sizes
from .loading import leaf_sections
from .objective import (
    ADVANTAGE_ESTIMATORS,
    KL_LOSS_TYPES,
    LOSS_TYPES,
    ObjectiveConfigError,
    ObjectiveFields,
    ObjectiveOptions,
)
from .reference import README_BEGIN, README_END, config_reference_markdown, update_readme
from .sections import (
    RM_TYPES,
    RULE_RM_TYPES,
    SECTIONS,
    BufferConfig,
    DataConfig,
    EngineConfig,
    EvalConfig,
    EvalDatasetConfig,
    FilterConfig,
    ModelConfig,
    RewardConfig,
    RolloutConfig,
    StorageConfig,
    rm_type_problem,
)
from .train import CheckpointConfig, TrainConfig

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "KL_LOSS_TYPES",
    "LOSS_TYPES",
    "README_BEGIN",
    "README_END",
    "RM_TYPES",
    "RULE_RM_TYPES",
    "SECTIONS",
    "BufferConfig",
    "CampaignConfig",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EngineConfig",
    "EvalConfig",
    "EvalDatasetConfig",
    "FilterConfig",
    "ModelConfig",
    "ObjectiveConfigError",
    "ObjectiveFields",
    "ObjectiveOptions",
    "RewardConfig",
    "RolloutConfig",
    "Section",
    "StorageConfig",
    "TrainConfig",
    "check_train_settings",
    "config_reference_markdown",
    "format_validation_error",
    "leaf_sections",
    "resolve_batch_sizes",
    "rm_type_problem",
    "update_readme",
]
