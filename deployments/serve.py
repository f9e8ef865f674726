"""Serve the `train`, `prepare` and `evaluate` deployments of one campaign from one process.

    slime-wf serve-deployments --config campaign.yaml [--set key=value ...] [--cron "0 3 * * *"]

Each deployment is named after the campaign and what it does (`deployment_name`):
`train/<campaign>-run-or-resume`, `prepare/<campaign>-prepare-checkpoint`,
`evaluate/<campaign>-evaluate-committed-policy`; each takes the whole campaign config as its default
`config` parameter. Prefect merges a run's parameters over the defaults one
top-level key at a time, so a run that passes `config` passes the whole config (the UI's form is
prefilled with the defaults; edit a field and submit).

Runs execute in subprocesses of this process, in its working directory: relative paths of the
config (run store, scratch, checkpoints) resolve there. Stopping the process pauses the schedule.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError

from flows.prefect_settings import configure_prefect_environment
from slime_wf.config import CampaignConfig, ConfigError

logger = logging.getLogger(__name__)

FLOW_NAMES = ("train", "prepare", "evaluate")
# what each flow's deployment does, after the campaign's name in the deployment's name
WHAT_IT_DOES = {
    "train": "run-or-resume",
    "prepare": "prepare-checkpoint",
    "evaluate": "evaluate-committed-policy",
}


def deployment_name(flow_name: str, campaign: str) -> str:
    """`<campaign>-<what it does>`: the deployment of `flow_name`, as `<flow>/<name>` finds it."""
    return f"{campaign}-{WHAT_IT_DOES[flow_name]}"


def api_url() -> str:
    """The Prefect API this process talks to; a served deployment needs a real, lasting server."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise ConfigError(
            "PREFECT_API_URL is not set: deployments and schedules need a running Prefect server. "
            "Start one with `prefect server start` and run `export PREFECT_API_URL=http://127.0.0.1:4200/api`"
        )
    return url


def check_cron(cron: str | None) -> str | None:
    if cron is None:
        return None
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron)
    except ValidationError:
        raise ConfigError(
            f"--cron {cron!r} is not a cron expression: give five fields, minute hour day month weekday "
            "(UTC), e.g. '0 3 * * *' for 03:00 every day"
        ) from None
    return cron


def build_deployments(cfg: CampaignConfig, cron: str | None = None) -> list[Any]:
    """The three deployments (`prefect.deployments.runner.RunnerDeployment`) of campaign `cfg`."""
    from prefect.deployments.runner import EntrypointType

    import flows.campaign

    parameters = {"config": cfg.model_dump(mode="json")}
    tags = ["slime-wf", f"campaign:{cfg.campaign}"]
    out = []
    for flow_name in FLOW_NAMES:
        flow = getattr(flows.campaign, flow_name)
        out.append(
            flow.to_deployment(
                name=deployment_name(flow_name, cfg.campaign),
                cron=check_cron(cron) if flow_name == "train" else None,
                parameters=parameters,
                tags=tags,
                description=f"{(flow.description or '').strip()} Campaign {cfg.campaign}.",
                # two runs of one campaign at once would write the same run store
                concurrency_limit=1,
                # the flows are an installed package: the module path works from any directory
                entrypoint_type=EntrypointType.MODULE_PATH,
            )
        )
    return out


def serve(config_path: str, overrides: list[str] | None = None, cron: str | None = None) -> None:
    """Load the campaign config, register its deployments and run their flow runs until interrupted."""
    configure_prefect_environment()  # an entry point: before Prefect is imported
    cfg = CampaignConfig.from_yaml(config_path, overrides)
    url = api_url()
    deployments = build_deployments(cfg, cron)
    from prefect import serve as prefect_serve

    logger.info(
        "serving %s for campaign %s against %s",
        ", ".join(f"{n}/{deployment_name(n, cfg.campaign)}" for n in FLOW_NAMES),
        cfg.campaign,
        url,
    )
    prefect_serve(*deployments)
