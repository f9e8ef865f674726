"""The Prefect `train` flow with the run store and Prefect's result storage on s3:// (a moto_server)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from helpers.tiny_campaign import campaign_dict, make_assets

from slime_wf.campaign import check_campaign_invariant
from slime_wf.store import RunStore

pytestmark = pytest.mark.slow


def test_train_flow_on_s3(tmp_path, s3_server, s3_bucket, prefect_server):
    make_assets(tmp_path)
    store = f"s3://{s3_bucket}/runs"
    cfg = campaign_dict(tmp_path, store, "on-s3", rollout_max_response_len=8)
    config = tmp_path / "campaign.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PREFECT_API_URL=prefect_server, PYTHONPATH=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-m", "slime_wf_cli", "train", "--config", str(config)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    runs = RunStore(f"{store}/on-s3")
    assert runs.read_manifest()["last_completed_rollout_id"] == 1
    assert runs.exists(RunStore.checkpoint_dir(1) + "/trainer_state.json")  # checkpoints uploaded
    check_campaign_invariant(runs)
    # Prefect's task results went to the same bucket, through the saved RemoteFileSystem block
    results = runs.listdir("prefect")
    assert (
        "rollout-000001-finish_rollout.json" in results and "rollout-000000-generate_rollout.json" in results
    )
    stored = json.loads(runs.read_text("prefect/rollout-000000-generate_rollout.json"))
    assert json.loads(stored["result"])["rollout_id"] == 0
