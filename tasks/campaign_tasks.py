"""The Prefect tasks of a campaign: each reads from the run store, calls slime_wf, writes back, and
returns a small JSON manifest that Prefect persists per rollout id.

Retries follow what is safe to repeat: a rollout restores its data-source state before a retry,
and a weight sync is idempotent, so both retry on engine faults. Training never retries blindly:
a failed step may have half-applied an optimizer update, so the trainer (the whole torchrun group)
is rebuilt from the committed checkpoint first (`Campaign.train_with_recovery`).
Taking the writer lease never retries: a live holder is another train, and waiting would not help.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task

from slime_wf.campaign import Campaign
from slime_wf.rollout.engine_client import EngineError
from slime_wf.rollout.engines import EngineStartError
from slime_wf.training.trainer_group import join_commands

ENGINE_FAULTS = (EngineError, EngineStartError, ConnectionError, TimeoutError)


def _retry_on_engine_fault(task, task_run, state) -> bool:
    try:
        state.result()
    except ENGINE_FAULTS:
        return True
    except Exception:
        return False
    return False


def _persisted(fn, name: str, **options):
    """A task whose result is stored as JSON under `<campaign>/prefect/rollout-<id>-<name>.json`; its
    body always runs (the campaign itself skips completed work), so a re-run never restores stale state.

    Prefect fills the key with `str.format`, so it reads the campaign's name from the task's own
    `campaign` argument (attribute access), and the tasks need no parameter that only names it."""
    return task(
        fn,
        name=name,
        persist_result=True,
        result_serializer="json",
        refresh_cache=True,
        result_storage_key="{parameters[campaign].cfg.campaign}/prefect/rollout-{parameters[rollout_id]:06d}-"
        + name
        + ".json",
        **options,
    )


def _prepare(campaign: Campaign) -> dict[str, str]:
    return campaign.prepare()


def _acquire_lease(campaign: Campaign) -> dict[str, Any]:
    campaign.acquire_lease()
    record = campaign.lease.record
    return {"host": record["host"], "pid": record["pid"], "lease": campaign.store.url("lease.json")}


def _start(campaign: Campaign) -> int:
    t = campaign.cfg.train
    if t.actor_num_nodes > 1:  # start() waits for them
        for command in join_commands(
            t.trainer_rdzv_endpoint, t.actor_num_nodes, t.actor_num_gpus_per_node, t.trainer_rdzv_timeout_s
        ):
            get_run_logger().warning(
                "the trainer group waits for its other nodes at %s; join with: %s",
                t.trainer_rdzv_endpoint,
                command,
            )
    return campaign.start()


def _generate_rollout(campaign: Campaign, rollout_id: int) -> dict[str, Any]:
    summary = campaign.rollout(rollout_id)
    get_run_logger().info(
        "rollout %d: %d groups, raw reward %.3f, %d groups in the buffer",
        rollout_id,
        summary["num_groups"],
        summary["raw_reward"],
        summary["buffer"],
    )
    return summary


def _train_step(campaign: Campaign, rollout_id: int) -> dict[str, float]:
    return campaign.train_with_recovery(rollout_id, warn=get_run_logger().warning)


def _sync_weights(campaign: Campaign, rollout_id: int) -> dict[str, float]:
    return campaign.sync_weights(rollout_id)


def _evaluate(campaign: Campaign, rollout_id: int) -> dict[str, float]:
    return campaign.evaluate(rollout_id)


def _open_for_evaluation(campaign: Campaign) -> int | None:
    return campaign.open_for_evaluation()


def _evaluate_committed(campaign: Campaign, rollout_id: int | None) -> dict[str, float]:
    return campaign.evaluate_committed(rollout_id)


def _finish_rollout(campaign: Campaign, rollout_id: int, metrics: dict) -> dict[str, Any]:
    return campaign.finish(rollout_id, metrics)


# Tasks whose results are not kept say so: otherwise Prefect hashes their inputs, the whole Campaign, for a
# cache key, and fails (with an error in the log) once it holds a lease or engines (threads and locks).
prepare_checkpoint = task(
    _prepare,
    name="prepare_checkpoint",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=_retry_on_engine_fault,
    persist_result=False,
)
acquire_lease = task(_acquire_lease, name="acquire_lease", persist_result=False)
start_campaign = task(
    _start,
    name="start_campaign",
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=_retry_on_engine_fault,
    persist_result=False,
)
open_for_evaluation = task(
    _open_for_evaluation,
    name="open_for_evaluation",
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=_retry_on_engine_fault,
    persist_result=False,
)
evaluate_committed = task(
    _evaluate_committed,
    name="evaluate_committed",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=_retry_on_engine_fault,
    persist_result=False,
)
generate_rollout = _persisted(
    _generate_rollout,
    "generate_rollout",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=_retry_on_engine_fault,
)
train_step = _persisted(_train_step, "train_step")
sync_weights = _persisted(
    _sync_weights, "sync_weights", retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_on_engine_fault
)
evaluate = _persisted(
    _evaluate, "evaluate", retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_on_engine_fault
)
finish_rollout = _persisted(_finish_rollout, "finish_rollout")
