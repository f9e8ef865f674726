"""Campaigns on a torchrun trainer group (issue 12): the tiny-math demo at TP=2 through the flow (with a
kill -9 and resume) and at DP=2 in the plain loop; two trainer nodes on loopback, the second joining
with the command the campaign prints; a rank killed mid-campaign, after which the group restarts from
the committed checkpoint and trains the lost rollout ids again (with PPO's critic)."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import free_port
from helpers.campaign_killer import (
    STALL_S,
    committed,
    kill_when,
    start_train,
    wait_no_processes,
    wait_until,
)
from helpers.tiny_campaign import campaign_dict, make_assets

from slime_wf.campaign import Campaign, check_campaign_invariant
from slime_wf.config import CampaignConfig, ConfigError
from slime_wf.store import RunStore
from slime_wf.training.trainer_client import RemoteTrainer, TrainerServiceError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny-math"
# The demo, shortened: 2 rollout ids of 4 prompts x 4 samples, one engine.
SHORT = [
    "num_rollout=2",
    "rollout_batch_size=4",
    "n_samples_per_prompt=4",
    "over_sampling_batch_size=6",
    "micro_batch_size=4",
    "num_engines=1",
]
WARNINGS = (
    "ignore::DeprecationWarning:megatron.*",
    "ignore::FutureWarning:torch.*",
    "ignore::FutureWarning:megatron.*",
)


# ---- the settings (fast) -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["tensor_model_parallel_size=2"],
            r"tensor_model_parallel_size=2 does not divide the trainer's world size 1 "
            r"\(train.actor_num_nodes=1 x train.actor_num_gpus_per_node=1\)",
        ),
        (
            ["actor_num_gpus_per_node=3", "tensor_model_parallel_size=2"],
            "does not divide the trainer's world size 3",
        ),
        (["actor_num_nodes=2"], "actor_num_nodes=2 needs train.trainer_rdzv_endpoint"),
        (["actor_num_nodes=2", "trainer_rdzv_endpoint=head-node"], "'head-node' is not host:port"),
        (
            ["actor_num_gpus_per_node=8", "rollout_batch_size=2", "n_samples_per_prompt=2"],
            r"global batch size 4 .* is smaller than the data-parallel size 8",
        ),
    ],
)
def test_group_settings_are_checked_together(overrides, message):
    with pytest.raises(ConfigError, match=message):
        CampaignConfig.from_dict({}, overrides)


def test_a_group_of_several_nodes_is_described_by_its_settings():
    cfg = CampaignConfig.from_dict(
        {},
        [
            "actor_num_nodes=3",
            "actor_num_gpus_per_node=2",
            "tensor_model_parallel_size=2",
            "trainer_rdzv_endpoint=10.0.0.1:29500",
            "rollout_batch_size=4",
        ],
    )
    args = cfg.args()
    assert (args.actor_num_nodes, args.actor_num_gpus_per_node, args.trainer_rdzv_endpoint) == (
        3,
        2,
        "10.0.0.1:29500",
    )
    # a world of 6 at TP=2 is 3 data-parallel replicas; the campaign's node is node 0 and hosts the rendezvous
    from slime_wf.training.trainer_group import join_commands, torchrun_command

    assert join_commands("10.0.0.1:29500", 3, 2) == [
        f"slime-wf trainer-node --rdzv-endpoint 10.0.0.1:29500 --nnodes 3 --nproc-per-node 2 --rdzv-timeout-s 900 "
        f"--node-rank {k}"
        for k in (1, 2)
    ]
    head = torchrun_command(2, nnodes=3, rdzv_endpoint="10.0.0.1:29500", generation="g1")
    assert {
        "--nnodes=3",
        "--node-rank=0",
        "--rdzv-backend=static",
        "--rdzv-endpoint=10.0.0.1:29500",
        "--rdzv-id=g1",
    } <= set(head)


# ---- the tiny-math demo on a group (slow) ------------------------------------------------------------


def _load_make_assets():
    spec = importlib.util.spec_from_file_location("tiny_math_make_assets", EXAMPLE / "make_assets.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo_assets(tmp_path_factory) -> Path:
    """The demo's assets, with a warm start just long enough for answers in the boxed format."""
    ma = _load_make_assets()
    out = tmp_path_factory.mktemp("tiny-math")
    ma.make_assets(out, ma.Settings(sft_steps=60, sft_batch_size=16, blur_steps=2), measure=False)
    return out


def demo_config(assets: Path, root: Path, campaign: str) -> dict:
    """examples/tiny-math/campaign.yaml over `assets`, its store and scratch under `root`."""
    cfg = yaml.safe_load((EXAMPLE / "campaign.yaml").read_text())
    cfg["campaign"] = campaign
    cfg["model"].update(hf_checkpoint=str(assets / "model"), cache_dir=str(root / "cache"))
    cfg["data"]["prompt_data"] = str(assets / "train.jsonl")
    (evalset,) = cfg["eval"]["eval_datasets"]
    evalset.update(path=str(assets / "test.jsonl"), n_samples_per_eval_prompt=2)
    cfg["storage"] = {"store": str(root / "store"), "scratch_dir": str(root / "scratch")}
    return cfg


def _service_starts(log: Path) -> list[str]:
    return [line for line in log.read_text(errors="replace").splitlines() if line.startswith("==== starting")]


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.filterwarnings(*WARNINGS)
def test_demo_trains_at_tp2_through_the_flow_and_resumes_after_kill_9(demo_assets, tmp_path, prefect_server):
    config = tmp_path / "campaign.yaml"
    config.write_text(yaml.safe_dump(demo_config(demo_assets, tmp_path, "demo-tp2")))
    overrides = [*SHORT, "save_interval=1", "actor_num_gpus_per_node=2", "tensor_model_parallel_size=2"]
    store = RunStore(str(tmp_path / "store" / "demo-tp2"))
    service = f"slime_wf.training.service.*{tmp_path}"

    proc = start_train(config, prefect_server, overrides=overrides)
    assert kill_when(proc, lambda: committed(store) >= 0, "rollout 0 committed"), (
        tmp_path / "train.log"
    ).read_text()
    assert committed(store) == 0
    wait_no_processes(service)  # rank 0 notices that its campaign is gone, and the group goes with it
    proc = start_train(config, prefect_server, overrides=overrides)
    assert proc.wait(timeout=STALL_S) == 0, (tmp_path / "train.log").read_text()[-4000:]
    assert "campaign demo-tp2 resumes at rollout 1 of 2" in (tmp_path / "train.log").read_text()

    assert store.read_manifest()["last_completed_rollout_id"] == 1
    check_campaign_invariant(store)
    # resumed from the committed checkpoint by a new group: the optimizer steps go on
    assert [
        store.read_json(RunStore.rollout_file(r, "metrics.json"))["train/optimizer_step"] for r in (0, 1)
    ] == [1.0, 2.0]
    starts = _service_starts(tmp_path / "scratch" / "demo-tp2" / "logs" / "trainer.log")
    assert len(starts) == 2 and all("--nproc-per-node=2" in line for line in starts)
    assert (
        '"tensor_model_parallel_size": 2'
        in (tmp_path / "scratch" / "demo-tp2" / "trainer" / "args.json").read_text()
    )
    wait_no_processes(service)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.filterwarnings(*WARNINGS)
def test_demo_trains_data_parallel_in_the_plain_loop(demo_assets, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = CampaignConfig.from_dict(
        demo_config(demo_assets, tmp_path, "demo-dp2"), [*SHORT, "actor_num_gpus_per_node=2"]
    )
    with Campaign(cfg) as campaign:
        manifest = campaign.run()
        assert isinstance(campaign.trainer, RemoteTrainer) and len(campaign.trainer.pids) == 2
        assert campaign.trainer.ping() == {"step": 2, "rollout_id": 1}
        assert campaign.trainer.initial_weights.origin == "hf_checkpoint"  # read through the protocol
        pids = campaign.trainer.pids
    assert manifest["last_completed_rollout_id"] == 1
    store = RunStore.for_campaign(cfg)
    report = check_campaign_invariant(store)
    assert report["trained"] == 2 * 4
    assert "eval/test/reward" in store.read_json(RunStore.rollout_file(1, "metrics.json"))
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


# ---- many nodes and faults, on the tiny campaign (slow) ----------------------------------------------


def _tiny_config(root: Path, campaign: str, num_rollout: int, **train) -> Path:
    make_assets(root)
    cfg = campaign_dict(root, str(root / "store"), campaign, num_rollout=num_rollout)
    cfg["train"].update(train)
    path = root / "campaign.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _rank_pids(root: Path) -> dict[int, int]:
    """Global rank -> pid of the trainer service's ranks under `root`."""
    found = {}
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "slime_wf.training.service" in cmdline and any(str(root) in arg for arg in cmdline):
            try:
                rank = proc.environ().get("RANK")
            except psutil.Error:
                continue
            if rank is not None:  # the torchrun agent has none
                found[int(rank)] = proc.pid
    return found


@pytest.mark.slow
def test_a_node_that_never_joins_fails_the_start_with_the_join_command(tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    expected = (
        rf"(?s)died while starting \(waiting at {re.escape(endpoint)} for the other 1 trainer nodes, which join "
        rf"with: slime-wf trainer-node --rdzv-endpoint {re.escape(endpoint)} --nnodes 2 --nproc-per-node 1 "
        rf"--rdzv-timeout-s 3 --node-rank 1\)"
    )
    with pytest.raises(TrainerServiceError, match=expected):
        RemoteTrainer(
            {},
            tmp_path / "model",
            nproc_per_node=1,
            nnodes=2,
            rdzv_endpoint=endpoint,
            rdzv_timeout_s=3,
            work_dir=tmp_path / "service",
            startup_timeout=120,
        )


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_two_trainer_nodes_on_loopback_join_with_the_printed_command(tmp_path, prefect_server):
    config = _tiny_config(
        tmp_path, "two-nodes", 2, actor_num_nodes=2, trainer_rdzv_endpoint=f"127.0.0.1:{free_port()}"
    )
    train_log = tmp_path / "train.log"
    proc = start_train(config, prefect_server)
    joiner = None
    try:
        line = wait_until(
            lambda: re.search(
                r"join with: (slime-wf trainer-node .*--node-rank 1)",
                train_log.read_text(errors="replace") if train_log.exists() else "",
            ),
            "the campaign to print the join command",
            timeout_s=STALL_S,
        ).group(1)
        command = [sys.executable, "-m", "slime_wf_cli", *shlex.split(line)[1:]]
        with open(tmp_path / "node1.log", "wb") as log:
            joiner = subprocess.Popen(
                command,
                env=dict(os.environ, OMP_NUM_THREADS="1"),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        assert proc.wait(timeout=STALL_S) == 0, train_log.read_text()[-4000:]
    finally:
        proc.kill()
        if joiner is not None:
            os.killpg(joiner.pid, signal.SIGTERM)
            joiner.wait(timeout=120)
    store = RunStore(str(tmp_path / "store" / "two-nodes"))
    assert store.read_manifest()["last_completed_rollout_id"] == 1
    check_campaign_invariant(store)
    assert "joining trainer group" in (tmp_path / "node1.log").read_text()
    # the head's torchrun was node 0 of 2; the ranks of node 1 got their settings from rank 0
    (start,) = _service_starts(tmp_path / "scratch" / "two-nodes" / "logs" / "trainer.log")
    assert "--nnodes=2" in start and "--node-rank=0" in start
    wait_no_processes(f"slime_wf.training.service.*{tmp_path}")


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_killed_rank_restarts_the_group_from_the_committed_checkpoint(tmp_path, prefect_server):
    """DP=2 with PPO's critic, a checkpoint every 2 ids. Rank 1 dies after rollout 2 is trained but not
    committed: the group restarts from checkpoint 1, trains rollout 2 again from its stored samples,
    then rollout 3, and the campaign ends with every group accounted for."""
    config = _tiny_config(
        tmp_path,
        "rank-kill",
        4,
        actor_num_gpus_per_node=2,
        advantage_estimator="ppo",
        num_critic_only_steps=1,
    )
    raw = yaml.safe_load(config.read_text())
    raw["checkpoint"] = {"save_interval": 2}
    config.write_text(yaml.safe_dump(raw))
    store = RunStore(str(tmp_path / "store" / "rank-kill"))
    proc = start_train(config, prefect_server)
    try:
        ranks = wait_until(
            lambda: len(_rank_pids(tmp_path)) == 2 and _rank_pids(tmp_path),
            "the trainer group's two ranks",
            timeout_s=STALL_S,
        )
        wait_until(
            lambda: store.exists(RunStore.rollout_file(2, "metrics.json")) or proc.poll() is not None,
            "rollout 2 trained",
            timeout_s=STALL_S,
        )
        assert proc.poll() is None and committed(store) == 1
        os.kill(ranks[1], signal.SIGKILL)
        assert proc.wait(timeout=STALL_S) == 0, (tmp_path / "train.log").read_text()[-4000:]
    finally:
        proc.kill()
    train_log = (tmp_path / "train.log").read_text()
    assert (
        "restarting the trainer from the committed checkpoint (rollout 1) and training 2, 3 again"
        in train_log
    )
    assert store.read_manifest()["last_completed_rollout_id"] == 3
    check_campaign_invariant(store)
    metrics = [store.read_json(RunStore.rollout_file(r, "metrics.json")) for r in range(4)]
    assert all("train/critic/value_loss" in m for m in metrics) and "train/loss" not in metrics[0]
    steps = [m["train/optimizer_step"] for m in metrics]
    assert steps[3] - steps[2] == steps[2] - steps[1] == 1.0, (
        steps
    )  # rollout 2 was trained once on the new group
    assert store.exists(RunStore.checkpoint_dir(3) + "/critic/trainer_state.json")
    assert len(_service_starts(tmp_path / "scratch" / "rank-kill" / "logs" / "trainer.log")) == 2
    wait_no_processes(f"slime_wf.training.service.*{tmp_path}")
