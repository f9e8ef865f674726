"""Weight sync in disk mode: after export and /update_weights_from_disk the engine serves exactly the
trainer's current weights (BF16/FP32 as trained, or FP8-cast when the rollout runs in FP8)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from helpers.tiny_models import make_tiny_model

from slime_wf.checkpoint import CheckpointError
from slime_wf.checkpoint.fp8_convert import convert_checkpoint
from slime_wf.checkpoint.fp8_format import Fp8Format
from slime_wf.config import CampaignConfig
from slime_wf.rollout.engines import EngineFleet
from slime_wf.training.model import forward_logits
from slime_wf.training.trainer import Trainer
from slime_wf.types import Sample
from slime_wf.weight_sync.disk import sync_weights
from slime_wf.weight_sync.verify import verify_served_weights

pytestmark = pytest.mark.slow

PROMPT = [5, 7, 9, 11]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sync")
    model = str(make_tiny_model(root / "model", layers=2, hidden=64))
    args = CampaignConfig.from_dict(
        {
            "rollout": {"rollout_batch_size": 1, "n_samples_per_prompt": 2},
            "engine": {"num_engines": 1, "local_engine_threads": 1},
            "train": {"lr": 5e-2, "micro_batch_size": 2},
        }
    ).args()
    trainer = Trainer(args, model)
    samples = [
        Sample(
            group_index=0,
            index=i,
            tokens=[*PROMPT, 12 + i, 13, 14],
            response_length=3,
            loss_mask=[1, 1, 1],
            reward=float(i),
            rollout_log_probs=[-2.0, -2.0, -2.0],
            status=Sample.Status.COMPLETED,
        )
        for i in range(2)
    ]
    trainer.train(samples, rollout_id=0)  # the weights now differ from the checkpoint the engine started with
    with EngineFleet(args, model, log_dir=str(root / "logs")) as fleet:
        yield trainer, fleet, root
    trainer.shutdown()


def served_greedy(fleet, n=6):
    async def run():
        async with fleet.session() as session:
            out = await session.client(fleet.urls[0]).generate(
                {
                    "input_ids": PROMPT,
                    "return_logprob": True,
                    "sampling_params": {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True},
                },
                timeout=120,
            )
            return out

    out = asyncio.run(run())
    pairs = out["meta_info"]["output_token_logprobs"]
    return (
        [int(t) for _, t, _ in pairs],
        [float(lp) for lp, _, _ in pairs],
        out["meta_info"]["weight_version"],
    )


def test_engine_serves_the_trainers_current_weights(setup):
    trainer, fleet, root = setup
    metrics = sync_weights(fleet, trainer, str(root / "weights-1"), "1", verify=True)
    assert metrics["sync/max_logprob_diff"] < 1e-3 and metrics["sync/bytes"] > 0
    tokens, logprobs, version = served_greedy(fleet)
    assert version == "1" and fleet.weight_version == "1"
    # the trainer's own forward over the served sequence gives the same greedy choices and log-probs
    ids = torch.tensor([PROMPT + tokens])
    with torch.no_grad():
        logits = forward_logits(trainer.actor, ids).float()
    lp = torch.log_softmax(logits[0, len(PROMPT) - 1 : -1], dim=-1)
    assert logits[0, len(PROMPT) - 1 : -1].argmax(-1).tolist() == tokens
    torch.testing.assert_close(
        lp[torch.arange(len(tokens)), tokens], torch.tensor(logprobs), atol=1e-4, rtol=0
    )


def test_fp8_sync_serves_the_fp8_cast_weights(setup):
    trainer, fleet, root = setup
    fp8 = {"strategy": "block", "block_size": [32, 32]}
    metrics = sync_weights(fleet, trainer, str(root / "weights-2"), "2", fp8=fp8, verify=True)
    assert metrics["sync/max_logprob_diff"] < 1e-3
    assert '"quant_method": "fp8"' in (root / "weights-2" / "config.json").read_text().replace("'", '"')


def test_verification_catches_stale_weights(setup):
    trainer, fleet, root = setup
    other = make_tiny_model(root / "other", layers=2, hidden=64, seed=5)

    async def run():
        async with fleet.session() as session:
            await verify_served_weights(session, str(other))

    with pytest.raises(CheckpointError, match="does not serve"):
        asyncio.run(run())


def published_fp8(model_dir, out, keep: str):
    """An FP8 checkpoint in a layout of its own: 16x32 blocks, and `keep` left in high precision (listed in
    modules_to_not_convert) although slime-wf's own rule would quantize it."""
    import json

    from safetensors.torch import load_file, save_file

    convert_checkpoint(str(model_dir), str(out), "block", (16, 32), progress=False)
    tensors = load_file(out / "model.safetensors")
    tensors[keep] = load_file(model_dir / "model.safetensors")[keep]
    del tensors[keep + "_scale_inv"]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "model.safetensors.index.json").unlink()
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["modules_to_not_convert"].append(keep.removesuffix(".weight"))
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_sync_casts_to_the_served_fp8_checkpoints_own_format(setup):
    from safetensors import safe_open

    trainer, fleet, root = setup
    keep = "model.layers.0.self_attn.o_proj.weight"
    fmt = Fp8Format.of_checkpoint(published_fp8(root / "model", root / "published", keep))
    out = root / "weights-4"
    metrics = sync_weights(fleet, trainer, str(out), "4", fp8=fmt, verify=True)
    assert metrics["sync/max_logprob_diff"] < 1e-3  # the engine serves the trainer's weights, FP8-cast

    exported = Fp8Format.of_checkpoint(out)
    assert exported.scales == fmt.scales and exported.quantization_config == fmt.quantization_config
    assert (exported.strategy, exported.block_size) == ("block", (16, 32))
    with safe_open(out / "model.safetensors", "pt") as f:
        dtypes = {name: f.get_tensor(name).dtype for name in f.keys()}
    assert {n for n, d in dtypes.items() if d == torch.float8_e4m3fn} == set(fmt.scales) and len(
        fmt.scales
    ) == 13
    assert (
        dtypes[keep] == torch.float32
        and dtypes["model.layers.0.mlp.down_proj.weight_scale_inv"] == torch.float32
    )

    async def served():
        async with fleet.session() as session:
            return await session.client(fleet.urls[0]).model_info()

    info = asyncio.run(served())
    assert (info["model_path"], info["weight_version"]) == (str(out), "4")
