"""The Prefect tasks of a campaign: each reads from the run store, calls slime_wf, writes back, and
returns a small JSON manifest that Prefect persists per rollout id.

Retries follow what is safe to repeat: a rollout restores its data-source state before a retry,
and a weight sync is idempotent, so both retry on engine faults. Training never retries blindly:
a failed step may have half-applied an optimizer update, so the trainer (the whole torchrun group)
is rebuilt from the committed checkpoint first (`Campaign.train_with_recovery`).
Taking the writer lease never retries: a live holder is another train, and waiting would not help.

Task runs are named by rollout id (`rollout-000007/train`), so a step of an id is found by name in
the UI. Inside `generate_rollout`, each wave of completed groups is rewarded and filtered in a task
run of its own (`rollout-000007/reward-filter-002`), submitted from the rollout loop through the
library's scorer hook (`slime_wf.rollout.scoring`); its JSON result holds the wave's rewards and
filter verdicts, and a remote reward model's failure is retried there, not by redoing the rollout.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from typing import Any

from prefect import get_run_logger, task
from prefect.context import TaskRunContext

from slime_wf.campaign import Campaign
from slime_wf.rollout.engine_client import EngineError
from slime_wf.rollout.engines import EngineStartError
from slime_wf.rollout.rm_hub import RewardError
from slime_wf.rollout.rm_hub.remote import RemoteRewardError, RemoteRewardTimeout
from slime_wf.rollout.scoring import WaveVerdicts, scoring_with
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


class RemoteRewardFailure(RuntimeError):
    """A wave's rewards failed while the campaign's reward is a remote reward model (`rm_type: remote_rm`)."""


# a remote reward model's faults: refused or unusable answers, no answer in time, a lost connection; a
# retry a little later (a server restarted, a deploy finished) may well get an answer
REWARD_FAULTS = (RemoteRewardFailure, RemoteRewardError, RemoteRewardTimeout, ConnectionError)


def _retry_on_reward_fault(task, task_run, state) -> bool:
    try:
        state.result()
    except Exception as err:
        seen: BaseException | None = err
        while seen is not None:
            if isinstance(seen, REWARD_FAULTS):
                return True
            seen = seen.__cause__ or seen.__context__
        return False
    return False


# the step's word in its task runs' names (`rollout-000007/train`)
RUN_NAMES = {"generate_rollout": "generate", "train_step": "train", "finish_rollout": "finish"}


def _persisted(fn, name: str, **options):
    """A task whose result is stored as JSON under `<campaign>/prefect/rollout-<id>-<name>.json`; its
    body always runs (the campaign itself skips completed work), so a re-run never restores stale state.

    Prefect fills the key with `str.format`, so it reads the campaign's name from the task's own
    `campaign` argument (attribute access), and the tasks need no parameter that only names it."""
    return task(
        fn,
        name=name,
        task_run_name="rollout-{rollout_id:06d}/" + RUN_NAMES.get(name, name).replace("_", "-"),
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


def _reward_filter(
    campaign_name: str,
    rollout_id: int,
    wave: int,
    group_indices: list[int],
    score,
    remote: bool = False,
    loop: asyncio.AbstractEventLoop | None = None,
) -> WaveVerdicts:
    """The wave's work, `score()`, runs in the rollout's event loop `loop`; this body waits for it."""
    try:
        return asyncio.run_coroutine_threadsafe(score(), loop).result()
    except RewardError as err:
        if remote:  # the hub reports a remote model's failure as a RewardError; retried as one
            raise RemoteRewardFailure(f"rollout {rollout_id}, wave {wave}: {err}") from err
        raise


# One wave of a rollout's completed groups, rewarded and filtered (`slime_wf.rollout.scoring`).
reward_filter = task(
    _reward_filter,
    name="reward_filter",
    task_run_name="rollout-{rollout_id:06d}/reward-filter-{wave:03d}",
    persist_result=True,
    result_serializer="json",
    refresh_cache=True,
    result_storage_key="{parameters[campaign_name]}/prefect/rollout-{parameters[rollout_id]:06d}-reward-filter-"
    "{parameters[wave]:03d}.json",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=_retry_on_reward_fault,
)


class PrefectScorer:
    """The rollout loop's scorer (`slime_wf.rollout.scoring.Scorer`): each wave is a `reward_filter`
    task run whose result goes where the calling task's results go.

    The task run is a sync one, run in a worker thread, while the wave's work stays a coroutine in
    the rollout's event loop: Prefect's bookkeeping (creating the task run, its states, the result
    file) then never holds up the loop, which goes on generating, and the task run uses the API
    client the flow run has open. (An async task run would open a client of its own in each new
    event loop, one per rollout, which costs about 0.1 s on a busy machine.)"""

    # Each task run costs Prefect's bookkeeping (its states, the result file): groups completed within
    # this many seconds share one wave (never past the moment they could fill the batch, see the loop).
    wave_wait_s = 1.0

    def __init__(self, campaign_name: str, result_storage: Any = None, *, remote: bool = False):
        self.campaign_name = campaign_name
        self.remote = remote  # the campaign's reward is a remote model: its failures are retried
        self.task = (
            reward_filter.with_options(result_storage=result_storage) if result_storage else reward_filter
        )

    async def __call__(self, rollout_id: int, wave: int, group_indices: list[int], score) -> WaveVerdicts:
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()  # the flow and task run context, for the task run's thread
        run = functools.partial(
            context.run,
            self.task,
            self.campaign_name,
            rollout_id,
            wave,
            group_indices,
            score,
            self.remote,
            loop,
        )
        return await loop.run_in_executor(None, run)


def _generate_rollout(campaign: Campaign, rollout_id: int) -> dict[str, Any]:
    context = TaskRunContext.get()
    storage = context.task.result_storage if context is not None else None
    remote = campaign.cfg.reward.rm_type == "remote_rm"
    with scoring_with(PrefectScorer(campaign.cfg.campaign, storage, remote=remote)):
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
    task_run_name="prepare-checkpoint",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=_retry_on_engine_fault,
    persist_result=False,
)
acquire_lease = task(
    _acquire_lease, name="acquire_lease", task_run_name="acquire-lease", persist_result=False
)
start_campaign = task(
    _start,
    name="start_campaign",
    task_run_name="start",
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=_retry_on_engine_fault,
    persist_result=False,
)
open_for_evaluation = task(
    _open_for_evaluation,
    name="open_for_evaluation",
    task_run_name="open-for-evaluation",
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=_retry_on_engine_fault,
    persist_result=False,
)
evaluate_committed = task(
    _evaluate_committed,
    name="evaluate_committed",
    task_run_name="evaluate-committed",
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
