"""kill -9 at moments read from the run store, restart with the same command: the campaign completes and
loses nothing. The moments are progress, not wall time: right after a commit, between a stored rollout
and its commit (training, sync or checkpointing), and while a resumed run starts its engines."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers.campaign_killer import (
    all_json_parses,
    committed,
    file_grew,
    kill_when,
    rollout_stored,
    start_train,
    wait_no_processes,
)
from helpers.tiny_campaign import campaign_dict, make_assets

from slime_wf.campaign import check_campaign_invariant
from slime_wf.store import RunStore

# Progress, not time, decides each kill; the limit only stops a hung run (one slow core takes ~3x longer).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

NUM_ROLLOUT = 5


def _config(tmp_path: Path) -> Path:
    make_assets(tmp_path)
    cfg = campaign_dict(
        tmp_path,
        str(tmp_path / "store"),
        "killed",
        num_rollout=NUM_ROLLOUT,
        over_sampling_batch_size=4,
        rollout_max_response_len=16,
    )
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_kill_9_at_progress_moments_loses_nothing(tmp_path, prefect_server):
    config = _config(tmp_path)
    store = RunStore(str(tmp_path / "store" / "killed"))
    engine_log = tmp_path / "scratch" / "killed" / "logs" / "engine-0.log"
    moments = [
        ("rollout 0 committed", lambda: committed(store) >= 0),
        ("rollout 2 stored, not yet committed", lambda: rollout_stored(store, 2)),
        ("engines of the resumed run starting", None),  # set below: the log of this run's engine grows
    ]
    kills = []
    for what, condition in moments:
        if condition is None:
            condition = file_grew(engine_log, engine_log.stat().st_size if engine_log.exists() else 0)
        proc = start_train(config, prefect_server)
        assert kill_when(proc, condition, what), (
            f"the campaign ended before {what!r}: " + ((tmp_path / "train.log").read_text()[-3000:])
        )
        kills.append((what, committed(store)))
        all_json_parses(tmp_path / "store")
    print("kills (moment, committed id):", kills)

    proc = start_train(config, prefect_server)
    assert proc.wait(timeout=900) == 0, (tmp_path / "train.log").read_text()[-4000:]

    manifest = store.read_manifest()
    assert manifest["last_completed_rollout_id"] == NUM_ROLLOUT - 1
    for rid in range(NUM_ROLLOUT):
        for name in ("samples.jsonl", "ledger.json", "metrics.json", "data_source.json"):
            assert store.exists(RunStore.rollout_file(rid, name)), (rid, name)
        assert "rollout/raw_reward" in store.read_json(RunStore.rollout_file(rid, "metrics.json"))
    assert store.exists(RunStore.checkpoint_dir(NUM_ROLLOUT - 1))
    report = check_campaign_invariant(store)
    assert report["trained"] == NUM_ROLLOUT * 2
    assert all_json_parses(tmp_path / "store") > 0
    wait_no_processes(str(tmp_path / "model"))
