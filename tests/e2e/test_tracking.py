"""TensorBoard and wandb on a whole campaign killed twice with kill -9 and resumed: each tracker holds every
metric of every rollout id exactly once, read back with the trackers' own tools, and each id logged one
summary line. Every metric a campaign writes is documented in slime_wf.metrics under one of its prefixes."""

from __future__ import annotations

import collections
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers.campaign_killer import committed, kill_when, rollout_stored
from helpers.tiny_campaign import campaign_dict, make_assets

from slime_wf.metrics import PREFIXES, describe, numeric
from slime_wf.store import RunStore
from slime_wf.tracking import wandb_history, wandb_run_files

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

NUM_ROLLOUT = 4
CAMPAIGN = "tracked"

# The plain loop (no Prefect) in a process of its own, so that it can be killed; INFO logs go to its log file.
RUNNER = """
import logging, sys
from slime_wf.campaign import Campaign
from slime_wf.config import CampaignConfig
logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
logging.getLogger("slime_wf").setLevel(logging.INFO)
with Campaign(CampaignConfig.from_yaml(sys.argv[1])) as campaign:
    campaign.run()
"""


def _start(root: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(root), WANDB_SILENT="true")
    env.pop("WANDB_API_KEY", None)  # offline by default: what the test reads back
    log = open(root / "run.log", "ab")  # closed by the child's exit
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(root / "campaign.yaml")],
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


@pytest.fixture(scope="module")
def killed_campaign(tmp_path_factory):
    """A campaign with both trackers, killed while rollout 1 was provisional and right after rollout 2's
    commit, then resumed to the end; returns its folder."""
    root = tmp_path_factory.mktemp("tracking")
    make_assets(root)
    cfg = campaign_dict(
        root, str(root / "store"), CAMPAIGN, num_rollout=NUM_ROLLOUT, over_sampling_batch_size=4
    )
    cfg["tracking"] = {"use_tensorboard": True, "use_wandb": True, "wandb_group": "tiny"}
    (root / "campaign.yaml").write_text(yaml.safe_dump(cfg))
    store = RunStore(str(root / "store" / CAMPAIGN))
    moments = [
        ("rollout 1 stored, not committed", lambda: rollout_stored(store, 1) and committed(store) < 1),
        ("rollout 2 committed", lambda: committed(store) >= 2),
    ]
    for what, condition in moments:
        proc = _start(root)
        assert kill_when(proc, condition, what), (
            f"ended before {what!r}: {(root / 'run.log').read_text()[-3000:]}"
        )
    proc = _start(root)
    assert proc.wait(timeout=1200) == 0, (root / "run.log").read_text()[-4000:]
    assert store.read_manifest()["last_completed_rollout_id"] == NUM_ROLLOUT - 1
    return root


def _stored_metrics(root: Path) -> dict[int, dict[str, float]]:
    store = RunStore(str(root / "store" / CAMPAIGN))
    return {
        rid: numeric(store.read_json(RunStore.rollout_file(rid, "metrics.json")))
        for rid in range(NUM_ROLLOUT)
    }


def test_every_metric_is_documented_under_one_scheme(killed_campaign):
    for rid, metrics in _stored_metrics(killed_campaign).items():
        assert {
            "rollout/raw_reward",
            "train/loss",
            "train/grad_norm",
            "time/train_s",
            "filter/drop_fraction",
        } <= set(metrics)
        for name, value in metrics.items():
            assert name.startswith(PREFIXES) and describe(name) is not None, (rid, name)
            assert not (describe(name).sparse and value == 0), (rid, name)  # zero counters are left out
        # the duplicates are gone
        assert not {"loss", "pg_loss", "mean_reward", "train_time_s", "step_time_s", "rollout/time_s"} & set(
            metrics
        )


def test_tensorboard_holds_every_metric_of_every_id_once(killed_campaign):
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    log_dir = killed_campaign / "store" / CAMPAIGN / "tensorboard"
    files = sorted(p for p in log_dir.iterdir() if p.name.startswith("events.out.tfevents."))
    assert len(files) >= 2, files  # the killed runs wrote files that the resumed ones continued
    written = collections.Counter()
    for path in files:  # every event as written, so that a step written twice would show
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                written[(value.tag, event.step)] += 1
    assert max(written.values()) == 1, [k for k, n in written.items() if n > 1]

    acc = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0})
    acc.Reload()
    curves = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()[SCALARS]}
    expected = _stored_metrics(killed_campaign)
    assert set(curves) == {name for metrics in expected.values() for name in metrics}
    for rid, metrics in expected.items():
        for name, value in metrics.items():
            got = curves[name][rid]
            assert got == pytest.approx(value, rel=1e-6, abs=1e-6) or (math.isnan(got) and math.isnan(value))
    assert sorted(curves["rollout/raw_reward"]) == list(range(NUM_ROLLOUT))  # continuous across both kills


def test_wandb_offline_run_holds_every_id_once(killed_campaign):
    from wandb.proto import wandb_internal_pb2 as pb

    from slime_wf.tracking import wandb_records

    store_dir = killed_campaign / "store" / CAMPAIGN
    folders = sorted((store_dir / "wandb").glob("offline-run-*"))
    run_ids = {p.name.rsplit("-", 2)[-2] + "-" + p.name.rsplit("-", 2)[-1] for p in folders}
    assert len(folders) >= 2 and len(run_ids) == 1, folders  # one run, continued by each restart
    run_id = run_ids.pop()
    assert run_id.startswith(f"{CAMPAIGN}-")

    rows = [row for path in wandb_run_files(str(store_dir), run_id) for row in wandb_history(path)]
    steps = [row["_step"] for row in rows]
    assert sorted(steps) == steps == list(range(NUM_ROLLOUT)), steps  # in order, each id once
    for row, (rid, metrics) in zip(rows, sorted(_stored_metrics(killed_campaign).items()), strict=True):
        for name, value in metrics.items():
            assert row[name] == pytest.approx(value) or (math.isnan(row[name]) and math.isnan(value)), (
                rid,
                name,
            )

    # the run record of the start that finished (a killed start's service never wrote its file out)
    last = wandb_run_files(str(store_dir), run_id)[-1]
    for raw in wandb_records(last):
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "run":
            run = record.run
            assert (run.run_id, run.display_name, run.run_group, run.project) == (
                run_id,
                CAMPAIGN,
                "tiny",
                "slime-wf",
            )
            break
    else:
        raise AssertionError(f"{last} has no run record")

    # wandb's own CLI recognizes the folders as runs to upload
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "sync", "--dry-run", *map(str, folders)],
        capture_output=True,
        text=True,
        env=dict(os.environ, WANDB_SILENT="false"),
        timeout=120,
    )
    assert f"Would sync {len(folders)} run(s)" in out.stdout + out.stderr, out.stdout + out.stderr


def test_each_id_logs_one_summary_line(killed_campaign):
    log = (killed_campaign / "run.log").read_text()
    for rid in range(NUM_ROLLOUT):
        lines = [line for line in log.splitlines() if f"rollout {rid}: reward " in line]
        assert lines, f"no summary line for rollout {rid}"
        assert all("loss " in line and "grad_norm " in line and "dropped " in line for line in lines), lines
