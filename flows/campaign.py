"""The Prefect flows: `train` (the campaign loop), `prepare` (download and FP8 conversion), `evaluate`.

Each flow's parameters are one pydantic model, the campaign config, so the Prefect UI renders it
as a validated form. Task results are persisted as JSON per rollout id in the run store (a folder
locally, a saved RemoteFileSystem block for s3://). Artifacts go out from a background thread
(`flows.artifacts.ArtifactPublisher`), so the API round trips stay off the rollout loop.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.artifacts import ArtifactPublisher
from flows.runs import campaign_run_name, label_flow_run, run_logs, train_run_name
from slime_wf.campaign import Campaign
from slime_wf.config import CampaignConfig
from tasks import campaign_tasks as t


def result_storage(cfg: CampaignConfig) -> Any:
    """Where task results go: the run store's root (keys start with the campaign's name).

    For s3:// the saved block itself, not its name: Prefect resolves a task's storage on every
    task run, and a name costs a block read from the API each time."""
    store = cfg.storage.store.rstrip("/")
    if not store.startswith("s3://"):
        return Path(os.path.abspath(store))
    from prefect.filesystems import RemoteFileSystem

    settings: dict[str, Any] = {}
    endpoint = (
        cfg.storage.s3_endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    if endpoint:
        settings["client_kwargs"] = {"endpoint_url": endpoint}
    name = f"slime-wf-{cfg.campaign}".replace("_", "-")
    block = RemoteFileSystem(basepath=store, settings=settings)
    block.save(name, overwrite=True)
    return block


def _with_storage(task_obj, storage):
    return task_obj.with_options(result_storage=storage)


@flow(name="train", log_prints=True, flow_run_name=train_run_name)
def train(config: CampaignConfig) -> dict[str, Any]:
    """Run (or resume) a campaign from its next rollout id to `num_rollout`."""
    logger = get_run_logger()
    storage = result_storage(config)
    rollout, train_step, sync, evaluate, finish = (
        _with_storage(x, storage)
        for x in (t.generate_rollout, t.train_step, t.sync_weights, t.evaluate, t.finish_rollout)
    )
    name, total = config.campaign, config.rollout.num_rollout
    label_flow_run(name)
    # the campaign is left first, so its engines stop while the last artifacts go out; then they are flushed
    # leaving the campaign also releases its writer lease, whether the flow succeeded or failed
    with run_logs(), ArtifactPublisher(name, logger=logger) as artifacts, Campaign(config) as campaign:
        t.acquire_lease(campaign)  # before any download: a second train of the campaign fails at once
        t.prepare_checkpoint(campaign)
        first = t.start_campaign(campaign)
        label_flow_run(name, first)
        if first:
            logger.info("campaign %s resumes at rollout %d of %d", name, first, total)
        artifacts.load_history(campaign.store, first)
        artifacts.progress(first, total)
        train_async = config.rollout.train_async
        if train_async and first < total:
            rollout(campaign, first)
        for rid in range(first, total):
            ahead = None
            if not train_async:
                rollout(campaign, rid)
            elif rid + 1 < total:
                # slime's train_async: Prefect runs rollout id+1 in its task runner while id trains here
                ahead = rollout.submit(campaign, rid + 1)
            try:
                metrics = dict(train_step(campaign, rid))
                if ahead is not None:
                    ahead.result()  # the engines get new weights only between generations
            except BaseException:
                if ahead is not None:
                    ahead.wait()  # the rollout ends with the campaign's engines; do not leave it running
                raise
            metrics.update(sync(campaign, rid))
            if campaign.should_evaluate(rid):
                metrics.update(evaluate(campaign, rid))
            merged = finish(campaign, rid, metrics)
            artifacts.rollout(rid, merged)
            artifacts.progress(rid + 1, total)
        manifest = campaign.manifest()
    logger.info("campaign %s done: run store %s", name, campaign.store.uri)
    return manifest


@flow(name="prepare", log_prints=True, flow_run_name=campaign_run_name("prepare"))
def prepare(config: CampaignConfig) -> dict[str, str]:
    """Download the policy checkpoint and, with model.rollout_fp8, make its FP8 rollout copy."""
    label_flow_run(config.campaign)
    campaign = Campaign(config)
    with run_logs():
        return t.prepare_checkpoint(campaign)


@flow(name="evaluate", log_prints=True, flow_run_name=campaign_run_name("evaluate"))
def evaluate(config: CampaignConfig) -> dict[str, float]:
    """Evaluate the campaign's last committed policy on `eval.eval_datasets`.

    A reader: it may run while `train` runs. It serves the weights the manifest names, takes no
    lease, and writes only `evaluations/<rollout id>.json` in the run store."""
    if not config.eval.eval_datasets:
        raise ValueError("eval.eval_datasets is empty: name at least one evaluation set")
    label_flow_run(config.campaign)
    with run_logs(), Campaign(config) as campaign:
        t.prepare_checkpoint(campaign)
        rid = t.open_for_evaluation(campaign)
        return t.evaluate_committed(campaign, rid)
