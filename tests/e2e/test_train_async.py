"""`rollout.train_async` (slime's train_async): rollout id+1 is generated while id trains, the engines get
the new weights after each step, and the campaign still loses nothing, in the plain loop and the flow."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import yaml
from helpers.campaign_killer import all_json_parses, committed, kill_when, rollout_stored, start_train
from helpers.tiny_campaign import campaign_dict, make_assets

from slime_wf.campaign import Campaign, check_campaign_invariant
from slime_wf.config import CampaignConfig
from slime_wf.store import RunStore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

NUM_ROLLOUT = 4


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("async-assets"))


def async_config(assets: Path, tmp_path: Path, name: str = "a") -> dict:
    cfg = campaign_dict(
        assets,
        str(tmp_path / "store"),
        name,
        num_rollout=NUM_ROLLOUT,
        train_async=True,
        max_weight_staleness=1,
        rollout_max_response_len=16,
    )
    cfg["storage"]["scratch_dir"] = str(tmp_path / "scratch")
    return cfg


def test_the_next_rollout_is_generated_while_this_one_trains(assets, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(assets))
    cfg = CampaignConfig.from_dict(async_config(assets, tmp_path))
    overlapped = []
    started: dict[int, threading.Event] = {rid: threading.Event() for rid in range(NUM_ROLLOUT)}
    rollout, train = Campaign.rollout, Campaign.train_with_recovery

    def observed_rollout(self, rid):
        started[rid].set()
        return rollout(self, rid)

    def observed_train(self, rid, *args, **kwargs):
        # training id waits until id+1's generation has begun: with no overlap this would time out
        if rid + 1 < NUM_ROLLOUT:
            overlapped.append(started[rid + 1].wait(timeout=600))
        return train(self, rid, *args, **kwargs)

    import torch

    from slime_wf.campaign_trainer import trainer_cpu_threads
    from slime_wf.training.trainer import Trainer

    threads_in_train: list[int] = []
    trainer_train = Trainer.train

    def observed_trainer_train(self, *args, **kwargs):
        threads_in_train.append(torch.get_num_threads())
        return trainer_train(self, *args, **kwargs)

    monkeypatch.setattr(Campaign, "rollout", observed_rollout)
    monkeypatch.setattr(Campaign, "train_with_recovery", observed_train)
    monkeypatch.setattr(Trainer, "train", observed_trainer_train)
    threads_before = torch.get_num_threads()
    with Campaign(cfg) as campaign:
        manifest = campaign.run()
    assert overlapped == [True] * (NUM_ROLLOUT - 1)
    # on CPU the trainer trains on the cores the engines leave, and the process keeps its own setting
    assert set(threads_in_train) == {trainer_cpu_threads(cfg.args()) or threads_before}
    assert torch.get_num_threads() == threads_before
    assert manifest["last_completed_rollout_id"] == NUM_ROLLOUT - 1
    store = RunStore.for_campaign(cfg)
    report = check_campaign_invariant(store)
    assert report["trained"] == NUM_ROLLOUT * 2

    for rid in range(NUM_ROLLOUT):
        samples = store.read_jsonl(RunStore.rollout_file(rid, "samples.jsonl"))
        new = set(store.read_json(RunStore.rollout_file(rid, "ledger.json"))["drawn_new"])
        # rollout rid+1 is generated while rid trains: by the weights of rid-1 ("init" before any)
        expected = "init" if rid <= 1 else str(rid - 2)
        fresh = [s["weight_versions"] for s in samples if s["group_index"] in new]
        assert fresh and all(v == [expected] for v in fresh), (rid, fresh)
        metrics = store.read_json(RunStore.rollout_file(rid, "metrics.json"))
        assert metrics["rollout/weight_staleness_max"] <= 1  # the bound regenerates anything older
        assert metrics["rollout/weight_staleness_max"] == (0 if rid == 0 else 1) or not fresh
    # the engines serve what the last step trained
    assert manifest["weights"]["version"] == str(NUM_ROLLOUT - 1)


def test_kill_9_while_a_rollout_runs_ahead_of_the_commit_loses_nothing(assets, tmp_path, prefect_server):
    cfg = async_config(assets, tmp_path, "killed")
    config = tmp_path / "campaign.yaml"
    config.write_text(yaml.safe_dump(cfg))
    (tmp_path / "tiny_rewards.py").write_text((assets / "tiny_rewards.py").read_text())
    store = RunStore(str(tmp_path / "store" / "killed"))
    # the async moment: rollout 2 is stored while rollout 1 trains, and nothing past 0 is committed. The
    # window lasts from that store through rollout 1's training, sync and checkpoint, which wait for it.
    proc = start_train(config, prefect_server)
    moment = "rollout 2 stored before rollout 1 is committed"
    assert kill_when(proc, lambda: rollout_stored(store, 2) and committed(store) < 1, moment), (
        tmp_path / "train.log"
    ).read_text()[-3000:]
    assert committed(store) < 1 and rollout_stored(store, 2)
    all_json_parses(tmp_path / "store")

    proc = start_train(config, prefect_server)
    assert proc.wait(timeout=900) == 0, (tmp_path / "train.log").read_text()[-4000:]
    assert store.read_manifest()["last_completed_rollout_id"] == NUM_ROLLOUT - 1
    report = check_campaign_invariant(store)
    assert report["trained"] == NUM_ROLLOUT * 2
    for rid in range(NUM_ROLLOUT):
        assert "rollout/weight_staleness_max" in store.read_json(RunStore.rollout_file(rid, "metrics.json"))
