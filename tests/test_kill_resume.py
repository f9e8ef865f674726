"""kill -9 at random moments, restart with the same command: the campaign completes and loses nothing."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny_campaign import campaign_dict, make_assets

from slime_wf.campaign import check_campaign_invariant
from slime_wf.store import RunStore

pytestmark = pytest.mark.slow

NUM_ROLLOUT = 4


def _config(tmp_path: Path) -> Path:
    make_assets(tmp_path)
    cfg = campaign_dict(tmp_path, str(tmp_path / "store"), "killed", num_rollout=NUM_ROLLOUT,
                        over_sampling_batch_size=4, rollout_max_response_len=16)
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(config: Path, api_url: str) -> subprocess.Popen:
    env = dict(os.environ, PREFECT_API_URL=api_url, PYTHONPATH=str(config.parent))
    log = open(config.parent / "train.log", "ab")  # noqa: SIM115 - closed by the child's exit
    return subprocess.Popen(
        [sys.executable, "-m", "slime_wf.cli", "train", "--config", str(config)],
        cwd=config.parent, env=env, stdout=log, stderr=subprocess.STDOUT,
    )


def _all_json_parses(root: Path) -> int:
    """Every run-store record parses (a torn file would not). Prefect's own result files, which it
    writes non-atomically and this project never reads back, are left out."""
    count = 0
    for path in [*root.rglob("*.json"), *root.rglob("*.jsonl")]:
        if "prefect" in path.relative_to(root).parts:
            continue
        for line in path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]:
            json.loads(line)
        count += 1
    return count


def test_kill_9_at_random_moments_loses_nothing(tmp_path, prefect_server):
    config = _config(tmp_path)
    store = RunStore(str(tmp_path / "store" / "killed"))
    rng = random.Random(7)
    kills = 0
    for attempt in range(6):
        proc = _train(config, prefect_server)
        # random moments across startup, rollout, training, sync and checkpointing
        deadline = time.monotonic() + rng.uniform(6, 30)
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        if proc.poll() is not None:
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        committed = (store.read_manifest() or {}).get("last_completed_rollout_id")
        print(f"kill {kills} after attempt {attempt}: committed rollout {committed}")
        _all_json_parses(tmp_path / "store")
        if kills >= 3:
            break
    proc = _train(config, prefect_server)
    assert proc.wait(timeout=900) == 0, (tmp_path / "train.log").read_text()[-4000:]
    assert kills >= 1

    manifest = store.read_manifest()
    assert manifest["last_completed_rollout_id"] == NUM_ROLLOUT - 1
    for rid in range(NUM_ROLLOUT):
        for name in ("samples.jsonl", "ledger.json", "metrics.json", "data_source.json"):
            assert store.exists(RunStore.rollout_file(rid, name)), (rid, name)
        assert "rollout/raw_reward" in store.read_json(RunStore.rollout_file(rid, "metrics.json"))
    assert store.exists(RunStore.checkpoint_dir(NUM_ROLLOUT - 1))
    report = check_campaign_invariant(store)
    assert report["trained"] == NUM_ROLLOUT * 2
    assert _all_json_parses(tmp_path / "store") > 0
    time.sleep(2)  # engines notice their launcher is gone within a second
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path / "model")], capture_output=True, text=True).stdout
    assert leftovers.strip() == "", f"engine processes outlived their campaign: {leftovers}"
