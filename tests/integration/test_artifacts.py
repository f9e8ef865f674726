"""The campaign's Prefect artifacts: queued by the flow, sent from one background thread in order;
every rollout id's table and sample viewer goes out, a newer summary, curves or progress snapshot
replaces a queued older one, a failed call is a warning, the flush at the end is bounded; earlier
ids are read from the run store once; tables round for display only and leave zero counters out;
against a real server each key is one artifact of the run, updated in place."""

from __future__ import annotations

import json
import logging
import threading
from collections import defaultdict

import pytest
from helpers.campaign_killer import wait_until

from flows.artifacts import (
    LENGTH,
    REWARD,
    ArtifactPublisher,
    MetricsHistory,
    artifact_key,
    metrics_table,
    summary_table,
)
from slime_wf.metrics import describe, numeric
from slime_wf.store import RunStore

LOG = logging.getLogger("test.artifacts")


class Recorder:
    """A sender that records what it is given; it can hold every call until released, and fail some keys."""

    def __init__(self, *, hold: bool = False, fail_keys: tuple[str, ...] = ()):
        self.sent: list[tuple[str, str, object]] = []
        self.called = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.fail_keys = set(fail_keys)

    def __call__(self, kind: str, key: str, description: str, content: object) -> None:
        self.called.set()
        if not self.release.wait(30):
            raise TimeoutError("the test never released the sender")
        if key in self.fail_keys:
            raise ConnectionError("Prefect API unreachable")
        self.sent.append((kind, key, content))


def metrics(rid: int) -> dict:
    return {
        REWARD: rid / 10,
        LENGTH: 5.0 + rid,
        "train/loss": -0.5,
        "train/grad_norm": 0.007638888888888862,
        "filter/drop_fraction": 0.25,
        "rollout/request_timeouts": 0.0,  # a sparse counter at zero: not shown
        "time/rollout_s": 1.25,
        "time/train_s": 2.0,
        "note": "not a number",
    }


def test_artifact_keys_are_lowercase_letters_digits_and_dashes():
    assert (
        artifact_key("My_Campaign v2", "rollout", "000003", "metrics")
        == "my-campaign-v2-rollout-000003-metrics"
    )
    assert artifact_key("--a__b--", "curves") == "a-b-curves"


def test_every_table_goes_out_and_a_newer_snapshot_replaces_a_queued_one():
    send = Recorder(hold=True)
    publisher = ArtifactPublisher("Camp_1", send=send, logger=LOG)
    publisher.progress(0, 3)
    assert send.called.wait(10)  # progress 0 is in flight: the API "is slow"
    for rid in range(3):
        publisher.rollout(rid, metrics(rid))
        publisher.progress(rid + 1, 3)
    send.release.set()
    counts = publisher.close(timeout_s=30)

    assert [(kind, key) for kind, key, _ in send.sent] == [
        ("progress", "camp-1-progress"),
        ("table", "camp-1-rollout-000000-metrics"),
        ("table", "camp-1-rollout-000001-metrics"),
        ("table", "camp-1-rollout-000002-metrics"),
        ("table", "camp-1-summary"),
        ("markdown", "camp-1-curves"),
        ("progress", "camp-1-progress"),
    ]
    assert counts == {"queued": 13, "sent": 7, "replaced": 6, "failed": 0, "unsent": 0}
    content = [c for _, _, c in send.sent]
    assert content[0] == 0.0 and content[-1] == 100.0
    assert [r["rollout"] for r in content[4]] == [0, 1, 2]
    assert "![Camp_1 curves](data:image/png;base64," in content[5]


def test_the_curves_are_drawn_again_only_after_their_cpu_share_and_at_the_end(monkeypatch):
    """Drawing the chart is throttled to CURVES_CPU_SHARE of the time: with a share so small that the
    next drawing is never due during the run, the curves go out once at the first id and once more,
    with every id, when the publisher closes; every id's table goes out meanwhile."""
    import flows.artifacts as artifacts_module

    monkeypatch.setattr(artifacts_module, "CURVES_CPU_SHARE", 1e-12)
    send = Recorder()
    publisher = ArtifactPublisher("c", send=send, logger=LOG)
    publisher.rollout(0, metrics(0))
    wait_until(lambda: any(key == "c-curves" for _, key, _ in send.sent), what="the first curves")
    for rid in range(1, 4):
        publisher.rollout(rid, metrics(rid))
    wait_until(
        lambda: {"c-rollout-000003-metrics", "c-summary"} <= {key for _, key, _ in send.sent[-3:]},
        what="the last id's table and summary",
    )
    assert sum(key == "c-curves" for _, key, _ in send.sent) == 1  # the later ones wait
    counts = publisher.close(timeout_s=30)
    curves = [content for _, key, content in send.sent if key == "c-curves"]
    assert len(curves) == 2
    assert "rollout ids 0 to 0;" in curves[0] and "rollout ids 0 to 3;" in curves[1]
    assert counts["failed"] == counts["unsent"] == 0


def test_tables_round_for_display_and_leave_zero_counters_out():
    rows = {r["metric"]: r for r in metrics_table(metrics(3))}
    assert set(rows) == {REWARD, LENGTH, "train/loss", "train/grad_norm", "filter/drop_fraction"} | {
        "time/rollout_s",
        "time/train_s",
    }
    assert rows["train/grad_norm"]["value"] == 0.007639 and rows[LENGTH]["value"] == 8
    assert rows[REWARD]["meaning"].startswith("Mean reward of the trained samples")
    history = {rid: numeric(metrics(rid)) for rid in (0, 1)}
    history[1]["eval/test/reward"] = 0.123456
    assert summary_table(history) == [
        {
            "rollout": 0,
            "reward": 0,
            "eval test": "",
            "response len": 5,
            "loss": -0.5,
            "entropy": "",
            "rollout_kl": "",
            "grad norm": 0.007639,
            "dropped": "25%",
            "seconds": 3.2,
        },
        {
            "rollout": 1,
            "reward": 0.1,
            "eval test": 0.1235,
            "response len": 6,
            "loss": -0.5,
            "entropy": "",
            "rollout_kl": "",
            "grad norm": 0.007639,
            "dropped": "25%",
            "seconds": 3.2,
        },
    ]


def test_a_failed_artifact_is_a_warning_and_the_rest_still_go_out(caplog):
    send = Recorder(fail_keys=("c-rollout-000000-metrics",))
    publisher = ArtifactPublisher("c", send=send, logger=LOG)
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        publisher.rollout(0, metrics(0))
        publisher.rollout(1, metrics(1))
        counts = publisher.close(timeout_s=30)
    assert counts["failed"] == 1 and counts["unsent"] == 0
    assert "c-rollout-000001-metrics" in {key for _, key, _ in send.sent}
    assert send.sent[-1][:2] == ("markdown", "c-curves")
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "c-rollout-000000-metrics" in warning and "ConnectionError" in warning and "unreachable" in warning


def test_the_flush_at_the_end_gives_up_after_its_timeout(caplog):
    send = Recorder(hold=True)  # an API that does not answer
    publisher = ArtifactPublisher("c", send=send, logger=LOG)
    publisher.rollout(0, metrics(0))
    publisher.progress(1, 1)
    assert send.called.wait(10)
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        counts = publisher.close(timeout_s=0.5)  # returns although the call in flight never does
    assert not send.release.is_set()
    assert counts["unsent"] == 4 and counts["sent"] == 0  # the table in flight, summary, curves, progress
    assert any("4 artifact(s) of campaign c not sent within 0.5 s" in r.getMessage() for r in caplog.records)
    with pytest.raises(RuntimeError, match="closed"):
        publisher.progress(1, 1)
    send.release.set()  # the call in flight returns; nothing after it goes out
    publisher._thread.join(10)
    assert not publisher._thread.is_alive()
    assert [key for _, key, _ in send.sent] == ["c-rollout-000000-metrics"]


def test_leaving_with_an_error_still_sends_what_was_queued():
    send = Recorder(hold=True)
    with (
        pytest.raises(ValueError, match="training diverged"),
        ArtifactPublisher("c", send=send, logger=LOG) as publisher,
    ):
        publisher.rollout(0, metrics(0))
        publisher.progress(1, 2)
        threading.Timer(0.3, send.release.set).start()  # the API answers only after the flow failed
        raise ValueError("training diverged")
    assert [key for _, key, _ in send.sent] == [
        "c-rollout-000000-metrics",
        "c-summary",
        "c-curves",
        "c-progress",
    ]
    assert publisher.counts["sent"] == 4


def test_earlier_ids_are_read_once_then_the_history_grows_in_memory(tmp_path, monkeypatch):
    store = RunStore(str(tmp_path / "run"))
    for rid in (0, 2):  # id 1 has no metrics file: a gap in the curves
        store.write_json(RunStore.rollout_file(rid, "metrics.json"), metrics(rid))
    reads: list[str] = []
    read_json = RunStore.read_json

    def counted(self, path, *args, **kwargs):
        reads.append(path)
        return read_json(self, path, *args, **kwargs)

    monkeypatch.setattr(RunStore, "read_json", counted)
    send = Recorder()
    publisher = ArtifactPublisher("c", send=send, logger=LOG)
    publisher.load_history(store, 3)
    for rid in (3, 4, 5):
        store.write_json(RunStore.rollout_file(rid, "metrics.json"), metrics(rid))  # as the campaign does
        publisher.rollout(rid, metrics(rid))
    publisher.close(timeout_s=30)

    assert sorted(reads) == [RunStore.rollout_file(rid, "metrics.json") for rid in range(3)]
    summaries = [content for _, key, content in send.sent if key == "c-summary"]
    assert summaries and summaries[-1] == summary_table(MetricsHistory.from_store(store, 6).points)
    assert [row["rollout"] for row in summaries[-1]] == [0, 2, 3, 4, 5]


@pytest.mark.slow
def test_artifacts_reach_the_prefect_api_attached_to_the_flow_run(prefect_server, tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.context import get_run_context
    from prefect.logging.handlers import APILogHandler
    from prefect.settings import PREFECT_API_URL, temporary_settings

    store = RunStore(str(tmp_path / "run"))
    store.write_json(RunStore.rollout_file(0, "metrics.json"), metrics(0))
    for rid in (1, 2):
        store.write_jsonl(
            RunStore.rollout_file(rid, "samples.jsonl"),
            [{"group_index": rid, "index": 0, "prompt": "2+2?", "response": "4 | `x`", "reward": 1.0}],
        )

    def summary_artifacts() -> list:
        with get_client(sync_client=True) as client:
            return client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["pub-test-summary"]))
            )

    @flow(name="artifact-publisher")
    def publish() -> str:
        with ArtifactPublisher("Pub Test") as artifacts:  # the default sender: Prefect's API
            artifacts.load_history(store, 1)
            artifacts.progress(1, 3)
            for rid in (1, 2):
                artifacts.rollout(rid, metrics(rid))
                artifacts.progress(rid + 1, 3)
                if rid == 1:  # the summary exists before id 2's goes: that one is an update in place
                    wait_until(lambda: summary_artifacts(), what="the first summary artifact")
            counts = artifacts.close(timeout_s=60)
        assert counts["failed"] == counts["unsent"] == 0, counts
        return str(get_run_context().flow_run.id)

    def events(client, name: str, resource: str | None = None) -> list[dict]:
        body: dict = {"filter": {"event": {"name": [name]}}}
        if resource is not None:
            body["filter"]["any_resource"] = {"id": [resource]}
        return client.request("POST", "/events/filter", json={**body, "limit": 50}).json()["events"]

    with temporary_settings({PREFECT_API_URL: prefect_server}):
        flow_run_id = publish()
        APILogHandler().flush()  # the run's log lines, while the server is still up
        with get_client(sync_client=True) as client:
            found = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="pub-test-"))
            )
            # the run's events reach the store in the order they were sent: its end comes after them all
            wait_until(
                lambda: events(client, "prefect.flow-run.Completed", f"prefect.flow-run.{flow_run_id}"),
                what="the flow run's Completed event in the server's event store",
            )
            run = f"prefect.flow-run.{flow_run_id}"
            created = events(client, "prefect.artifact.created", run)
            # an update in place is no event carrying the whole new table (the store keeps every one)
            updated = events(client, "prefect.artifact.updated", run)
    by_key = defaultdict(list)
    for artifact in sorted(found, key=lambda a: a.created):
        by_key[artifact.key].append(artifact)
    assert set(by_key) == {
        "pub-test-rollout-000001-metrics",
        "pub-test-rollout-000001-samples",
        "pub-test-rollout-000002-metrics",
        "pub-test-rollout-000002-samples",
        "pub-test-summary",
        "pub-test-curves",
        "pub-test-progress",
    }
    # one artifact per key in the run: the campaign-wide ones are updated in place
    assert {key: len(artifacts) for key, artifacts in by_key.items()} == dict.fromkeys(by_key, 1)
    assert {str(a.flow_run_id) for a in found} == {flow_run_id}
    (table,) = by_key["pub-test-rollout-000002-metrics"]
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert {"metric": "train/loss", "value": -0.5, "meaning": describe("train/loss").meaning} in rows
    (summary,) = by_key["pub-test-summary"]
    summary_rows = json.loads(summary.data) if isinstance(summary.data, str) else summary.data
    assert [r["rollout"] for r in summary_rows] == [0, 1, 2]  # id 0 came from the run store
    assert by_key["pub-test-curves"][0].data.startswith("## Pub Test: curves by rollout id")
    assert "```text\n4 | `x`\n```" in by_key["pub-test-rollout-000002-samples"][0].data
    assert by_key["pub-test-progress"][0].data == 100.0
    assert {e["resource"]["prefect.resource.name"] for e in created} >= set(by_key)
    assert updated == []
