"""The trackers against their own files: a tracker that wrote ids and died is reopened, reads back how far it
got, and neither loses nor repeats an id; an s3:// store gets the event files of the local mirror."""

from __future__ import annotations

import collections
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from slime_wf.store import RunStore
from slime_wf.tracking import TensorBoardTracker, Tracking, WandbTracker, wandb_history, wandb_run_files


def _metrics(rid: int) -> dict[str, float]:
    return {"rollout/raw_reward": rid / 10, "train/loss": -float(rid), "rollout_id": rid}


def _tb_steps(log_dir: Path) -> collections.Counter:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    written: collections.Counter = collections.Counter()
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                written[(value.tag, event.step)] += 1
    return written


def test_tensorboard_resumes_after_the_last_step_it_holds(tmp_path):
    log_dir = tmp_path / "tb"
    first = Tracking([TensorBoardTracker(str(log_dir))])
    first.log_committed(2, _metrics)  # ids 0..2 written; then the process "dies" without closing
    first.trackers[0]._writer.flush()

    again = Tracking([TensorBoardTracker(str(log_dir))])
    assert again.next_id("tensorboard") == 3
    again.log_committed(
        1, _metrics
    )  # the store's commit is behind what the tracker holds: nothing is written
    again.log_committed(4, _metrics)
    again.close()
    written = _tb_steps(log_dir)
    assert set(written.values()) == {1}  # no (tag, step) twice
    assert sorted(step for tag, step in written if tag == "train/loss") == [0, 1, 2, 3, 4]
    assert "rollout_id" not in {tag for tag, _ in written}


def test_an_id_without_metrics_stays_a_gap_and_a_failing_tracker_retries(tmp_path):
    class Flaky:
        name = "flaky"

        def __init__(self):
            self.fail, self.got = True, []

        def last_step(self):
            return None

        def complete(self, rid, metrics_of):
            pass

        def write(self, rid, metrics):
            if self.fail:
                raise OSError("disk full")
            self.got.append(rid)

        def close(self):
            pass

    flaky = Flaky()
    tracking = Tracking([flaky])
    tracking.log_committed(1, lambda rid: None if rid == 0 else _metrics(rid))
    assert tracking.next_id("flaky") == 1  # id 0 had no metrics (a gap); id 1 failed and waits
    flaky.fail = False
    tracking.log_committed(2, _metrics)
    assert flaky.got == [1, 2]


def test_s3_store_gets_the_event_files_and_a_new_host_continues(tmp_path, s3_bucket):
    store = RunStore(f"s3://{s3_bucket}/camp")
    upload = store.child("tensorboard")
    tracking = Tracking([TensorBoardTracker(str(tmp_path / "mirror-a"), upload)])
    tracking.log_committed(1, _metrics)
    tracking.close()
    assert any(n.startswith("events.out.tfevents.") for n in upload.listdir())

    other_host = Tracking([TensorBoardTracker(str(tmp_path / "mirror-b"), upload)])  # an empty mirror
    assert other_host.next_id("tensorboard") == 2
    other_host.log_committed(3, _metrics)
    other_host.close()
    written = _tb_steps(tmp_path / "mirror-b")
    assert set(written.values()) == {1}
    assert sorted(step for tag, step in written if tag == "train/loss") == [0, 1, 2, 3]


@pytest.mark.slow
def test_wandb_offline_run_resumes_after_the_last_step_it_holds(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = SimpleNamespace(
        wandb_mode=None,
        wandb_project="p",
        wandb_team=None,
        wandb_group="g",
        wandb_run_name=None,
        campaign="camp",
    )
    first = Tracking([WandbTracker(args, "camp-0001", str(tmp_path), {"x": 1})])
    assert first.trackers[0].mode == "offline"
    first.log_committed(1, _metrics)
    first.close()

    again = Tracking([WandbTracker(args, "camp-0001", str(tmp_path), {"x": 1})])
    assert again.next_id("wandb") == 2
    again.log_committed(3, _metrics)
    again.close()
    files = wandb_run_files(str(tmp_path), "camp-0001")
    assert len(files) == 2 and all(
        os.path.basename(os.path.dirname(f)).startswith("offline-run-") for f in files
    )
    rows = [row for path in files for row in wandb_history(path)]
    assert [row["_step"] for row in rows] == [0, 1, 2, 3]
    assert [row["train/loss"] for row in rows] == [0.0, -1.0, -2.0, -3.0]


def test_tensorboard_completes_an_id_whose_write_was_cut_short(tmp_path):
    """A kill in the middle of an id's write leaves some of its scalars on disk: the resume writes the others
    of that id, none twice, and goes on after it."""
    log_dir = tmp_path / "tb"
    first = Tracking([TensorBoardTracker(str(log_dir))])
    first.log_committed(1, _metrics)
    cut = _metrics(2)
    first.trackers[0].write(2, {"rollout/raw_reward": cut["rollout/raw_reward"]})  # then the process dies

    again = Tracking([TensorBoardTracker(str(log_dir))])
    again.log_committed(3, _metrics)
    again.close()
    written = _tb_steps(log_dir)
    assert set(written.values()) == {1}
    assert sorted(step for tag, step in written if tag == "train/loss") == [0, 1, 2, 3]
    assert sorted(step for tag, step in written if tag == "rollout/raw_reward") == [0, 1, 2, 3]
