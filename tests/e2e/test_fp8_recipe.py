"""slime's FP8 recipe: an FP8 checkpoint as hf_checkpoint (served as it is, the tokenizer), BF16 weights in
ref_load for the reference and the trainer's start, load = the campaign's own checkpoint folder.

- the trainer's initial weights follow slime's rules (load: a trainer checkpoint resumes, an HF directory
  initialises; else ref_load; else hf_checkpoint, dequantized and flagged as lossy when it is FP8);
- slime's Megatron-LM torch_dist checkpoints are told apart from this project's and refused, naming the fix;
- end to end on a tiny campaign: every version the engines serve is FP8 in the checkpoint's own layout, and
  a kill -9 at a progress moment resumes from the committed checkpoint.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from helpers.campaign_killer import all_json_parses, committed, kill_when, start_train, wait_no_processes
from helpers.tiny_campaign import campaign_dict, make_assets
from helpers.tiny_models import load_safetensors_dir as tensors
from helpers.tiny_models import make_tiny_model

import slime_wf_cli as cli
from slime_wf.checkpoint import CheckpointError
from slime_wf.checkpoint.fp8_format import Fp8Format
from slime_wf.checkpoint.layout import (
    holds_trainer_checkpoint,
    megatron_checkpoint_evidence,
    refuse_megatron_checkpoint,
)
from slime_wf.store import RunStore

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny-math"
FP8 = torch.float8_e4m3fn


def convert_fp8(model_dir: Path, out: Path, block=(32, 32)) -> Path:
    """The FP8 checkpoint for rollout, made as a user would: `slime-wf convert-fp8`."""
    assert (
        cli.main(
            [
                "convert-fp8",
                "--model-dir",
                str(model_dir),
                "--save-dir",
                str(out),
                "--block-size",
                *map(str, block),
                "--no-progress",
            ]
        )
        == 0
    )
    return out


def assert_in_layout(folder: str | Path, fmt: Fp8Format) -> None:
    """`folder` holds FP8 weights in exactly the layout of the checkpoint `fmt` was read from."""
    got = Fp8Format.of_checkpoint(folder)
    assert got is not None, f"{folder} is not quantized"
    assert got.quantization_config == fmt.quantization_config and got.scales == fmt.scales, folder
    weights = tensors(Path(folder))
    assert {n for n, t in weights.items() if t.dtype == FP8} == set(fmt.scales), folder


# ---- slime's Megatron-LM torch_dist checkpoints -------------------------------------------------


def make_torch_dist(root: Path, iteration: int = 100) -> Path:
    """The layout slime's tools/convert_hf_to_torch_dist.py writes (file contents do not matter here)."""
    step = root / f"iter_{iteration:07d}"
    step.mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    for name in (".metadata", "common.pt", "metadata.json", "__0_0.distcp"):
        (step / name).write_bytes(b"x")
    return root


def make_fake_trainer_checkpoint(
    folder: Path, rollout_id: int, step: int, initial: dict | None = None
) -> Path:
    """This project's layout (slime_wf/training/checkpointing.py): trainer_state.json beside megatron/."""
    from slime_wf.training.checkpointing import FORMAT

    (folder / "megatron").mkdir(parents=True)
    for name in (".metadata", "common.pt"):
        (folder / "megatron" / name).write_bytes(b"x")
    extra = {"rollout_id": rollout_id, **({"initial_weights": initial} if initial else {})}
    (folder / "trainer_state.json").write_text(json.dumps({"format": FORMAT, "step": step, "extra": extra}))
    return folder


def test_megatron_checkpoints_are_told_apart_from_this_projects(tmp_path):
    slime_ckpt = make_torch_dist(tmp_path / "Qwen3-4B_torch_dist")
    assert megatron_checkpoint_evidence(slime_ckpt) == "latest_checkpointed_iteration.txt and iter_0000100/"
    (make_torch_dist(tmp_path / "no-tracker") / "latest_checkpointed_iteration.txt").unlink()
    assert (
        megatron_checkpoint_evidence(tmp_path / "no-tracker") == "iter_0000100/ with .metadata and common.pt"
    )
    assert "one iteration" in megatron_checkpoint_evidence(slime_ckpt / "iter_0000100")

    ours = make_fake_trainer_checkpoint(tmp_path / "checkpoints" / "000003", 3, 4)
    hf = make_tiny_model(tmp_path / "hf")
    for folder in (ours, ours.parent, hf, tmp_path / "missing", None):
        assert megatron_checkpoint_evidence(folder) is None, folder
    assert holds_trainer_checkpoint(ours) and holds_trainer_checkpoint(ours.parent)
    assert not holds_trainer_checkpoint(slime_ckpt)
    with pytest.raises(
        CheckpointError, match=r"the megatron/ folder inside the slime-wf trainer checkpoint .*000003"
    ):
        refuse_megatron_checkpoint(ours / "megatron", "load")


def test_megatron_checkpoints_are_refused_with_the_way_out(tmp_path):
    from slime_wf.campaign import prepare_checkpoint
    from slime_wf.config import CampaignConfig
    from slime_wf.training.trainer import resolve_initial_weights

    slime_ckpt = str(make_torch_dist(tmp_path / "Qwen3-4B_torch_dist"))
    hf = str(make_tiny_model(tmp_path / "hf"))
    expected = r"is a Megatron-LM torch_dist checkpoint .*Hugging Face BF16 directory it was converted from"
    with pytest.raises(CheckpointError, match="load='.*torch_dist' " + expected):
        resolve_initial_weights(slime_ckpt, None, hf)
    with pytest.raises(CheckpointError, match="ref_load='.*torch_dist' " + expected):
        resolve_initial_weights(None, slime_ckpt, hf)
    cfg = CampaignConfig.from_dict(
        {
            "model": {"hf_checkpoint": hf, "cache_dir": str(tmp_path / "cache")},
            "train": {"ref_load": slime_ckpt},
        }
    )
    with pytest.raises(
        CheckpointError, match="train.ref_load=.*" + expected
    ):  # before anything is downloaded
        prepare_checkpoint(cfg, progress=False)
    cfg.train.ref_load = str(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r"train.ref_load='.*nowhere' does not exist"):
        prepare_checkpoint(cfg, progress=False)


# ---- the trainer's initial weights --------------------------------------------------------------


def test_initial_weights_follow_slimes_rules(tmp_path):
    from slime_wf.training.trainer import InitialWeights, resolve_initial_weights

    bf16 = str(make_tiny_model(tmp_path / "bf16"))
    fp8 = str(convert_fp8(Path(bf16), tmp_path / "fp8"))
    other_hf = str(make_tiny_model(tmp_path / "other-hf", seed=3))
    record = {"kind": "hf", "path": bf16, "origin": "ref_load"}
    ckpts = tmp_path / "ckpts"
    make_fake_trainer_checkpoint(ckpts / "000000", 0, 1, record)
    make_fake_trainer_checkpoint(ckpts / "000001", 1, 2, record)
    old = make_fake_trainer_checkpoint(
        tmp_path / "old" / "000004", 4, 5
    )  # saved before checkpoints kept a record

    def rule(load, ref_load, hf=fp8):
        resume, initial = resolve_initial_weights(load, ref_load, hf)
        return (None if resume is None else resume.name), (initial.kind, initial.path, initial.origin)

    # 1. load holds trainer checkpoints: resume the latest; its record says what the campaign started from
    assert rule(str(ckpts), other_hf) == ("000001", ("hf", bf16, "ref_load"))
    assert rule(str(old.parent), None, bf16) == ("000004", ("hf", bf16, "hf_checkpoint"))
    # 2. load is an HF directory
    assert rule(other_hf, bf16) == (None, ("hf", other_hf, "load"))
    # 3. load holds nothing (the campaign's own checkpoint folder before its first save): ref_load
    assert rule(str(tmp_path / "runs" / "c" / "checkpoints"), bf16) == (None, ("hf", bf16, "ref_load"))
    assert rule(None, str(ckpts / "000000")) == (None, ("trainer", str(ckpts / "000000"), "ref_load"))
    # 4. hf_checkpoint: as it is when BF16, dequantized (lossy) when FP8
    assert rule(None, None, bf16) == (None, ("hf", bf16, "hf_checkpoint"))
    _, initial = resolve_initial_weights(None, None, fp8)
    assert initial == InitialWeights("hf_fp8", fp8, "hf_checkpoint") and initial.lossy
    with pytest.raises(FileNotFoundError, match=r"ref_load='.*nowhere' does not exist .*BF16 HF checkpoint"):
        resolve_initial_weights(None, str(tmp_path / "nowhere"), fp8)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe-models")
    bf16 = make_tiny_model(root / "bf16", layers=2, hidden=64)
    return bf16, convert_fp8(bf16, root / "fp8")


def _samples():
    from slime_wf.types import Sample

    prompt = [5, 7, 9, 11]
    return [
        Sample(
            group_index=0,
            index=i,
            tokens=[*prompt, 12 + i, 13, 14],
            response_length=3,
            loss_mask=[1, 1, 1],
            reward=float(i),
            rollout_log_probs=[-2.0, -2.0, -2.0],
            status=Sample.Status.COMPLETED,
        )
        for i in range(2)
    ]


TRAIN = {"rollout_batch_size": 1, "n_samples_per_prompt": 2, "micro_batch_size": 2, "lr": 1e-2}


@pytest.mark.slow
def test_trainer_starts_from_the_bf16_ref_load_beside_an_fp8_hf_checkpoint(checkpoints, tmp_path):
    from slime_wf.training.model import forward_logits
    from slime_wf.training.trainer import InitialWeights, Trainer

    bf16, fp8 = checkpoints
    ckpts = tmp_path / "checkpoints"
    args = {**TRAIN, "use_kl_loss": True, "kl_loss_coef": 0.1, "ref_load": str(bf16), "load": str(ckpts)}
    with Trainer(args, fp8) as trainer:
        assert trainer.initial_weights == InitialWeights("hf", str(bf16), "ref_load")
        trainer.export_hf(tmp_path / "initial")
        exported, original = tensors(tmp_path / "initial"), tensors(bf16)
        assert exported.keys() == original.keys() and all(
            torch.equal(exported[k], original[k]) for k in original
        )
        assert "quantization_config" not in json.loads((tmp_path / "initial" / "config.json").read_text())
        ids = torch.tensor([[5, 7, 9, 11, 13]])
        with torch.no_grad():  # the reference is the same BF16 weights, not the FP8-rounded ones
            assert torch.equal(forward_logits(trainer.ref, ids), forward_logits(trainer.actor, ids))
        metrics = trainer.train(_samples(), rollout_id=0)
        assert "init_from_dequantized_fp8" not in metrics
        trainer.save(ckpts / "000000", rollout_id=0)
    # a real checkpoint of this project is not mistaken for slime's format, and resuming it keeps the record
    assert megatron_checkpoint_evidence(ckpts / "000000") is None
    with Trainer(args, fp8) as trainer:
        assert trainer.step == 1 and trainer.rollout_id == 0
        assert trainer.initial_weights == InitialWeights("hf", str(bf16), "ref_load")


@pytest.mark.slow
def test_trainer_from_an_fp8_checkpoint_alone_is_lossy_and_says_so(checkpoints, tmp_path, caplog):
    from slime_wf.checkpoint.fp8 import dequantize_state_dict
    from slime_wf.training.trainer import Trainer

    _, fp8 = checkpoints
    with caplog.at_level(logging.WARNING), Trainer(TRAIN, fp8) as trainer:
        assert trainer.initial_weights.kind == "hf_fp8" and trainer.initial_weights.lossy
        trainer.export_hf(tmp_path / "initial")
        qcfg = json.loads((fp8 / "config.json").read_text())["quantization_config"]
        want = dequantize_state_dict(tensors(fp8), qcfg, dtype=torch.float32)
        got = tensors(tmp_path / "initial")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        assert trainer.train(_samples(), rollout_id=0)["init_from_dequantized_fp8"] == 1.0
    assert any(
        "dequantized weights of the FP8 checkpoint" in r.getMessage() and "lossy" in r.getMessage()
        for r in caplog.records
    )


# ---- the recipe end to end ----------------------------------------------------------------------


def recipe_dict(root: Path, store: str, campaign: str, **rollout) -> dict:
    """The tiny campaign the slime way: FP8 hf_checkpoint, BF16 ref_load, load = the campaign's checkpoints."""
    cfg = campaign_dict(root, store, campaign, **rollout)
    cfg["model"].update(hf_checkpoint=str(root / "model-fp8"), rollout_fp8=False)
    cfg["train"].update(ref_load=str(root / "model"), use_kl_loss=True, kl_loss_coef=0.01)
    cfg["checkpoint"] = {"load": f"{store}/{campaign}/checkpoints"}
    cfg["storage"].update(keep_weight_exports=100, check_weight_update_equal=True)
    return cfg


@pytest.fixture(scope="module")
def recipe_assets(tmp_path_factory):
    root = make_assets(tmp_path_factory.mktemp("recipe-assets"))
    convert_fp8(root / "model", root / "model-fp8")
    return root


def served_by_each_engine(campaign) -> list[dict]:
    async def run():
        async with campaign.fleet.session() as session:
            return [await session.client(url).model_info() for url in campaign.fleet.urls]

    return asyncio.run(run())


@pytest.mark.slow
def test_recipe_serves_fp8_in_the_checkpoints_layout_at_every_version(recipe_assets, tmp_path, monkeypatch):
    from slime_wf.campaign import Campaign
    from slime_wf.config import CampaignConfig

    monkeypatch.syspath_prepend(str(recipe_assets))
    store = str(tmp_path / "store")
    raw = recipe_dict(recipe_assets, store, "recipe", num_rollout=3)
    raw["engine"]["num_engines"] = 2
    raw["storage"]["scratch_dir"] = str(tmp_path / "scratch")
    cfg = CampaignConfig.from_dict(raw)
    fp8_dir = recipe_assets / "model-fp8"
    fmt = Fp8Format.of_checkpoint(fp8_dir)
    with Campaign(cfg) as campaign:
        first = campaign.start()
        assert first == 0 and campaign.paths["hf_dir"] == str(
            fp8_dir
        )  # tokenizer and config: the FP8 checkpoint
        assert campaign.trainer.initial_weights.origin == "ref_load"
        infos = served_by_each_engine(campaign)
        assert [i["weight_version"] for i in infos] == ["init", "init"]
        assert_in_layout(infos[0]["model_path"], fmt)
        # the trainer's BF16 start cast to the checkpoint's layout is the FP8 checkpoint itself, bit for bit
        init, published = tensors(Path(infos[0]["model_path"])), tensors(fp8_dir)
        assert init.keys() == published.keys()
        assert all(torch.equal(init[k].view(torch.uint8), published[k].view(torch.uint8)) for k in published)
        for rid in range(first, cfg.rollout.num_rollout):
            campaign.rollout(rid)
            metrics = campaign.train(rid)
            metrics.update(campaign.sync_weights(rid))  # check_weight_update_equal: served log-probs checked
            assert metrics["sync/max_logprob_diff"] < 1e-3
            infos = served_by_each_engine(campaign)
            assert {(i["model_path"], i["weight_version"]) for i in infos} == {
                (str(tmp_path / "scratch" / "recipe" / "weights" / f"{rid:06d}"), str(rid))
            }
            assert_in_layout(infos[0]["model_path"], fmt)
            merged = campaign.finish(rid, metrics)
            assert "init_from_dequantized_fp8" not in merged and merged["train/optimizer_step"] == rid + 1
    assert RunStore(f"{store}/recipe").read_manifest()["last_completed_rollout_id"] == 2


@pytest.mark.slow
@pytest.mark.timeout(1200)  # progress decides the kill; the limit only stops a hung run on a slow machine
def test_recipe_resumes_after_kill_9(recipe_assets, tmp_path, prefect_server):
    for name in ("model", "model-fp8", "prompts.jsonl", "tiny_rewards.py"):
        (tmp_path / name).symlink_to(recipe_assets / name)
    num_rollout = 3
    config = tmp_path / "campaign.yaml"
    config.write_text(
        yaml.safe_dump(
            recipe_dict(
                tmp_path,
                str(tmp_path / "store"),
                "killed",
                num_rollout=num_rollout,
                over_sampling_batch_size=4,
            )
        )
    )
    store = RunStore(str(tmp_path / "store" / "killed"))
    proc = start_train(config, prefect_server)
    assert kill_when(proc, lambda: committed(store) >= 0, "rollout 0 committed"), (
        "the campaign ended before its first commit: " + (tmp_path / "train.log").read_text()[-3000:]
    )
    all_json_parses(tmp_path / "store")

    proc = start_train(config, prefect_server)
    assert proc.wait(timeout=900) == 0, (tmp_path / "train.log").read_text()[-4000:]
    manifest = store.read_manifest()
    assert manifest["last_completed_rollout_id"] == num_rollout - 1
    from slime_wf.ledger import check_campaign_invariant

    assert check_campaign_invariant(store)["trained"] == num_rollout * 2
    # resumed from the committed checkpoint, not restarted from ref_load: the optimizer steps go on
    steps = [
        store.read_json(RunStore.rollout_file(rid, "metrics.json"))["train/optimizer_step"]
        for rid in range(num_rollout)
    ]
    assert steps == [1.0, 2.0, 3.0], steps
    # every version the engines were given, before and after the kill, is FP8 in the checkpoint's layout
    fmt = Fp8Format.of_checkpoint(tmp_path / "model-fp8")
    exports = sorted(
        p for p in (tmp_path / "scratch" / "killed" / "weights").iterdir() if not p.name.startswith(".")
    )
    # the resumed run serves the committed export (000000) again: no new export before the trainer is built
    assert {"resume-init", "000000", "000001", "000002"} <= {p.name for p in exports}
    assert "resume-0" not in {p.name for p in exports}
    for folder in exports:
        assert_in_layout(folder, fmt)
    assert manifest["weights"]["version"] == str(num_rollout - 1)
    wait_no_processes(str(tmp_path / "scratch"))


def test_tiny_math_recipe_reads_the_assets_the_script_makes():
    from slime_wf.config import CampaignConfig

    demo = CampaignConfig.from_yaml(str(EXAMPLE / "campaign.yaml"))
    cfg = CampaignConfig.from_yaml(str(EXAMPLE / "campaign-fp8-slime.yaml"))
    assets = Path("examples/tiny-math/assets")
    assert Path(cfg.model.hf_checkpoint) == assets / "model-fp8" and not cfg.model.rollout_fp8
    assert Path(cfg.train.ref_load) == assets / "model"
    assert Path(cfg.checkpoint.load) == Path(cfg.storage.store) / cfg.campaign / "checkpoints"
    # the rest is the demo's, so the two learn alike
    for section in ("data", "rollout", "engine", "reward", "filter", "eval"):
        assert getattr(cfg, section) == getattr(demo, section), section
    assert cfg.train.model_copy(update={"ref_load": None}) == demo.train
