"""What the Prefect UI shows of a campaign, read back from a real Prefect server: flow runs named after the
campaign and first rollout id and tagged with it; task runs named by rollout id, the reward-and-filter
waves among them with their JSON results in the run store; the artifacts by key, one per key and run
(progress updated in place); library warnings in the run's log and no "Finished in state Completed()"
lines of task runs. And a remote reward model's failure retried at task level."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from helpers.tiny_campaign import campaign_dict, make_assets

from slime_wf.store import RunStore

pytestmark = pytest.mark.slow

STEPS = ("generate", "train", "sync-weights", "finish")


def _train(tmp_path, api: str, cfg: dict) -> None:
    config = tmp_path / "campaign.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PREFECT_API_URL=api, PYTHONPATH=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-m", "slime_wf_cli", "train", "--config", str(config)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _client(api: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    settings = temporary_settings({PREFECT_API_URL: api})
    settings.__enter__()
    return get_client(sync_client=True), settings


def test_runs_tasks_artifacts_and_logs_of_a_campaign(tmp_path, prefect_server):
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterTags,
        LogFilter,
        LogFilterFlowRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    make_assets(tmp_path)
    store = str(tmp_path / "runs")
    cfg = campaign_dict(tmp_path, store, "ui", rollout_max_response_len=8)
    _train(tmp_path, prefect_server, cfg)
    cfg["rollout"]["num_rollout"] = 3  # a resume; the changed config makes the library warn
    _train(tmp_path, prefect_server, cfg)

    client, settings = _client(prefect_server)
    try:
        with client:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["campaign:ui"])),
                sort=FlowRunSort.START_TIME_ASC,
            )
            assert [r.name for r in runs] == ["ui@0", "ui@2 (resume)"]
            assert all({"slime-wf", "campaign:ui"} <= set(r.tags) for r in runs)
            first, resumed = runs

            def task_names(run) -> list[str]:
                tasks = client.read_task_runs(
                    task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[run.id]))
                )
                assert all(t.state.is_completed() for t in tasks), [(t.name, t.state) for t in tasks]
                return sorted(t.name for t in tasks)

            names = task_names(first)
            waves = [n for n in names if "/reward-filter-" in n]
            assert {n.split("/")[0] for n in waves} == {"rollout-000000", "rollout-000001"}
            assert sorted(set(names) - set(waves)) == sorted(
                ["acquire-lease", "prepare-checkpoint", "start"]
                + [f"rollout-{rid:06d}/{step}" for rid in (0, 1) for step in STEPS]
            )
            resumed_names = task_names(resumed)
            assert (
                "rollout-000002/train" in resumed_names
                and "rollout-000002/reward-filter-000" in resumed_names
            )

            def artifacts(run) -> dict[str, list]:
                found = client.read_artifacts(
                    artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
                )
                by_key: dict[str, list] = {}
                for artifact in found:
                    by_key.setdefault(artifact.key, []).append(artifact)
                return by_key

            by_key = artifacts(first)
            assert set(by_key) == {"ui-progress", "ui-summary", "ui-curves"} | {
                f"ui-rollout-{rid:06d}-{kind}" for rid in (0, 1) for kind in ("metrics", "samples")
            }
            assert all(len(v) == 1 for v in by_key.values()), {k: len(v) for k, v in by_key.items()}
            assert by_key["ui-progress"][0].data == 100.0
            later = artifacts(resumed)
            summary = later["ui-summary"][0].data
            rows = json.loads(summary) if isinstance(summary, str) else summary
            assert [row["rollout"] for row in rows] == [0, 1, 2]  # ids 0 and 1 from the run store

            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[resumed.id])), limit=200
            )
            messages = [log.message for log in logs]
            assert any("the config changed since the last run" in m for m in messages), messages
            finished = [
                log.message
                for log in logs
                if log.task_run_id is not None and log.message.startswith("Finished in state Completed")
            ]
            assert finished == []
    finally:
        settings.__exit__(None, None, None)

    # each wave's persisted result holds its groups' rewards and the filter's verdicts
    runs_store = RunStore(f"{store}/ui")
    for rid in (0, 1, 2):
        ledger = runs_store.read_json(RunStore.rollout_file(rid, "ledger.json"))
        samples = runs_store.read_jsonl(RunStore.rollout_file(rid, "samples.jsonl"))
        verdicts = {}
        for name in runs_store.listdir("prefect"):
            if name.startswith(f"rollout-{rid:06d}-reward-filter-"):
                stored = json.loads(runs_store.read_text(f"prefect/{name}"))
                for verdict in json.loads(stored["result"]):
                    verdicts[verdict["group_index"]] = verdict
        assert set(ledger["trained"]) <= {
            gi for gi, v in verdicts.items() if v["keep"] or v["keep_when_insufficient"]
        }
        for gi in ledger["trained"]:
            assert [s["reward"] for s in samples if s["group_index"] == gi] == verdicts[gi]["rewards"]


class _FlakyReward(BaseHTTPRequestHandler):
    calls = 0

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).calls += 1
        body, status = (b"warming up", 400) if type(self).calls == 1 else (b"0.75", 200)
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_remote_reward_failure_is_retried_by_the_reward_filter_task(tmp_path, prefect_server):
    from prefect import flow
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId
    from prefect.context import get_run_context

    from slime_wf.rollout.generate import RolloutContext
    from slime_wf.rollout.rm_hub import RewardHub
    from slime_wf.rollout.scoring import score_wave
    from slime_wf.types import Sample
    from tasks.campaign_tasks import PrefectScorer

    server = ThreadingHTTPServer(("127.0.0.1", 0), _FlakyReward)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    args = argparse.Namespace(
        rm_type="remote_rm",
        rm_url=f"http://127.0.0.1:{server.server_address[1]}/score",
        rm_api_key_env=None,
        rm_timeout=10.0,
        rm_on_error="raise",
        rm_failure_reward=0.0,
        reward_key=None,
        custom_rm_path=None,
        group_rm=False,
        dynamic_sampling_filter_path=None,
    )

    @flow(name="remote-reward-retry")
    def score_one_wave():
        async def go():
            async with RewardHub(1) as hub:
                ctx = RolloutContext(
                    args=args, session=None, tokenizer=None, rollout_id=4, reward_kwargs={"hub": hub}
                )
                group = [Sample(prompt="2+2?", response="4", label="4", index=0, group_index=9)]

                async def score():
                    return await score_wave(ctx, [(group, 9)], None, lambda g, gi: None)

                return await PrefectScorer("retry", tmp_path, remote=True)(4, 0, [9], score)

        return asyncio.run(go()), get_run_context().flow_run.id

    client, settings = _client(prefect_server)
    try:
        verdicts, run_id = score_one_wave()
        with client:
            (task_run,) = client.read_task_runs(
                task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[run_id]))
            )
    finally:
        settings.__exit__(None, None, None)
        server.shutdown()
    assert verdicts == [
        {"group_index": 9, "rewards": [0.75], "keep": True, "reason": None, "keep_when_insufficient": False}
    ]
    assert _FlakyReward.calls == 2  # the 400 was not retried inside the reward call, but by the task
    assert task_run.name == "rollout-000004/reward-filter-000" and task_run.run_count == 2
    assert task_run.state.is_completed()
    stored = json.loads((tmp_path / "retry/prefect/rollout-000004-reward-filter-000.json").read_text())
    assert json.loads(stored["result"]) == verdicts
