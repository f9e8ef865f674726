"""The `tracking` section: TensorBoard and wandb, under slime's flag names (`slime_wf.tracking` writes them)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Section


class TrackingConfig(Section):
    """Curves of every metric at step = rollout id (`slime_wf.tracking`); slime's flag names."""

    use_tensorboard: bool = Field(
        False,
        description="Write every metric to TensorBoard event files at step = rollout id, each committed id once "
        "(a resumed campaign continues the curves). `tensorboard --logdir <that folder>` shows them.",
    )
    tb_project_name: str | None = Field(
        None,
        description="Local folder of the TensorBoard logs; the run's are in its subfolder tb_experiment_name. null: "
        "<store>/<campaign>/tensorboard for a local run store; for an s3:// one a local mirror "
        "<scratch_dir>/<campaign>/tensorboard whose event files are uploaded to <store>/<campaign>/tensorboard after "
        "each write.",
    )
    tb_experiment_name: str | None = Field(
        None, description="The run's subfolder of tb_project_name. null: the campaign name."
    )
    use_wandb: bool = Field(
        False,
        description="Log every metric to wandb at step = rollout id, each committed id once, into one run per "
        "campaign that every resume continues (its id: <campaign>-<hash of the run store and its creation time>).",
    )
    wandb_project: str | None = Field(None, description="wandb project. null: slime-wf.")
    wandb_team: str | None = Field(
        None, description="wandb entity (team or user). null: the API key's default."
    )
    wandb_group: str | None = Field(None, description="wandb group of the run. null: none.")
    wandb_run_name: str | None = Field(
        None, description="Display name of the wandb run. null: the campaign name."
    )
    wandb_mode: Literal["online", "offline", "disabled", None] = Field(
        None,
        description="wandb mode. null: online when WANDB_API_KEY is set, else offline (upload later with "
        "`wandb sync --id <run id> <wandb_dir>/wandb/offline-run-*-<run id>`).",
    )
    wandb_dir: str | None = Field(
        None,
        description="Local folder wandb writes its run files under (in its subfolder wandb/). null: the campaign's "
        "run store folder when local, else <scratch_dir>/<campaign>.",
    )
