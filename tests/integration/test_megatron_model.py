"""The Megatron-core policy model at TP=1, in-process: HF parity for Qwen3 / Qwen2 / Llama (tied
and untied), weight conversion at several TP sizes, gradients, checkpoints (plain data only, no
pickled objects), HF export."""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import random
import shutil
import subprocess
import sys

import numpy as np
import psutil
import pytest
import torch
from helpers.megatron_helpers import VOCAB, make_hf_checkpoint, tiny_hf_config

from slime_wf.training import cpu_shim
from slime_wf.training.checkpointing import load_checkpoint, read_trainer_state, save_checkpoint
from slime_wf.training.hf_parity import run_hf_parity
from slime_wf.training.model import (
    UnsupportedConfigError,
    build_gpt_model,
    describe_hf_config,
    forward_logits,
)
from slime_wf.training.optimizer import build_optimizer
from slime_wf.training.parallel import destroy_parallel, init_parallel
from slime_wf.training.safe_load import UnsafeCheckpointError, read_dcp_metadata
from slime_wf.training.weights import (
    SafetensorsCheckpoint,
    hf_to_megatron,
    load_hf_checkpoint_into,
    megatron_shards_to_hf,
    megatron_to_hf,
    save_hf_checkpoint,
)

FAMILIES = [(family, tied) for family in ("qwen3", "qwen2", "llama") for tied in (False, True)]


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    made = {}

    def get(family: str, tied: bool):
        if (family, tied) not in made:
            out = tmp_path_factory.mktemp(f"{family}-{'tied' if tied else 'untied'}")
            made[family, tied] = make_hf_checkpoint(out, family, tied)
        return made[family, tied]

    return get


@pytest.fixture
def tp1():
    info = init_parallel(1, seed=0)
    yield info
    destroy_parallel()


def _hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def _loaded_model(path):
    model = build_gpt_model(path)
    load_hf_checkpoint_into(model, path)
    return model


def _loss(logits, input_ids, mask):
    keep = mask[:, 1:].bool()
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none"
    ).view(keep.shape)
    return per_token[keep].mean()


def _batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    return ids, mask


@pytest.mark.parametrize(("family", "tied"), FAMILIES)
def test_hf_parity_exact(hf_checkpoint, family, tied):
    report = run_hf_parity(str(hf_checkpoint(family, tied)))
    assert report["model_type"] == family and report["tied_embeddings"] == tied
    assert report["max_abs_logit_diff"] < 1e-4
    # A padded row against the same sequence alone: fp32 rounding of differently shaped matmuls, whose size
    # depends on the CPU's kernels (1.0e-5 seen on an AMD EPYC for logits of magnitude ~10).
    assert report["max_abs_pad_diff"] < 5e-5
    assert report["roundtrip_exact"], report["roundtrip_mismatched"]
    assert report["roundtrip_tensors"] == len(SafetensorsCheckpoint(hf_checkpoint(family, tied)))


@pytest.mark.parametrize(
    "rope",
    [
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_theta": 500000.0,
        },
        {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    ],
    ids=lambda rope: rope["rope_type"],
)
def test_hf_parity_with_rope_scaling(tmp_path, rope):
    path = make_hf_checkpoint(tmp_path / "llama", "llama", False, rope_parameters=rope, head_dim=16)
    report = run_hf_parity(str(path))
    assert report["max_abs_logit_diff"] < 1e-4 and report["roundtrip_exact"]


def test_parity_tolerance_is_meaningful(hf_checkpoint, tp1):
    """A 1% change of a single norm weight moves the logits far beyond the parity tolerance."""
    path = hf_checkpoint("qwen3", False)
    ids, mask = _batch()
    with torch.no_grad():
        reference = _hf_model(path)(input_ids=ids, attention_mask=mask).logits
        model = _loaded_model(path)
        assert reference.abs().max() > 1.0
        assert (forward_logits(model, ids, mask) - reference)[mask.bool()].abs().max() < 1e-4
        model.decoder.layers[1].self_attention.q_layernorm.weight[0] *= 1.01
        assert (forward_logits(model, ids, mask) - reference)[mask.bool()].abs().max() > 1e-3


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_conversion_round_trip_at_any_tp_size(tp_size):
    """HF -> per-rank Megatron shards -> HF is the identity, and each rank gets its share."""
    from transformers import AutoModelForCausalLM

    config = tiny_hf_config("qwen2", tied=False)  # q/k/v biases too
    config.num_attention_heads, config.num_key_value_heads = 8, 4  # 2 query heads per group, 4 groups
    torch.manual_seed(0)
    hf_state = AutoModelForCausalLM.from_config(config).state_dict()
    arch = describe_hf_config(config)
    shards = [hf_to_megatron(hf_state, config, rank, tp_size) for rank in range(tp_size)]
    padded = arch.padded_vocab_size(tp_size)
    assert shards[0]["embedding.word_embeddings.weight"].shape == (padded // tp_size, 64)
    qkv_rows = (8 + 2 * 4) * arch.head_dim // tp_size
    assert shards[-1]["decoder.layers.1.self_attention.linear_qkv.weight"].shape == (qkv_rows, 64)
    assert shards[0]["decoder.layers.0.mlp.linear_fc1.weight"].shape == (2 * 128 // tp_size, 64)
    assert shards[0]["decoder.layers.0.self_attention.linear_proj.weight"].shape == (
        64,
        8 * arch.head_dim // tp_size,
    )
    # rank 0's fused qkv starts with group 0's query heads, then group 0's key head
    q0 = hf_state["model.layers.0.self_attn.q_proj.weight"][: 2 * arch.head_dim]
    k0 = hf_state["model.layers.0.self_attn.k_proj.weight"][: arch.head_dim]
    fused0 = shards[0]["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert torch.equal(fused0[: 2 * arch.head_dim], q0)
    assert torch.equal(fused0[2 * arch.head_dim : 3 * arch.head_dim], k0)

    back = {}
    for name in shards[0]:
        back.update(megatron_shards_to_hf(name, [s[name] for s in shards], arch))
    assert set(back) == set(hf_state)
    assert all(torch.equal(back[k], hf_state[k]) for k in hf_state)


def test_conversion_rejects_mismatched_weights(hf_checkpoint):
    path = hf_checkpoint("llama", False)
    state = dict(SafetensorsCheckpoint(path))
    config = json.loads((path / "config.json").read_text())
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_norm.weight"):
        hf_to_megatron({**state, "model.layers.0.self_attn.q_norm.weight": torch.ones(16)}, config, 0, 1)
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        hf_to_megatron(state, config, 0, 1)
    with pytest.raises(UnsupportedConfigError, match="num_key_value_heads=2 .* tensor-parallel size 4"):
        hf_to_megatron(state, config, 0, 4)


@pytest.mark.parametrize(
    ("family", "change", "field"),
    [
        ("qwen3", {"model_type": "gpt2"}, "model_type"),
        ("qwen2", {"num_experts": 8}, "num_experts"),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 64}, "use_sliding_window"),
        ("qwen3", {"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
        ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_type"),
        (
            "llama",
            {
                "rope_parameters": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 2.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                    "rope_theta": 1e4,
                }
            },
            "low_freq_factor",
        ),
        ("llama", {"attention_bias": True}, "attention_bias"),
        ("llama", {"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_unsupported_configs_name_the_field(family, change, field):
    config = {**tiny_hf_config(family, tied=False).to_dict(), **change}
    with pytest.raises(UnsupportedConfigError, match=field):
        describe_hf_config(config)


def test_older_config_style_is_read():
    """transformers 4.x configs keep rope_theta / rope_scaling at the top level."""
    config = tiny_hf_config("llama", tied=True).to_dict()
    del config["rope_parameters"]
    config.update(
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    arch = describe_hf_config(config)
    assert (arch.rope_theta, arch.rope_scaling_factor, arch.tie_word_embeddings) == (500000.0, 8.0, True)


def test_padding_on_either_side_matches_unpadded(hf_checkpoint, tp1):
    model = _loaded_model(hf_checkpoint("qwen2", True))
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    pad = torch.zeros(1, 4, dtype=ids.dtype)
    ones, zeros = torch.ones(1, 7, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)
    with torch.no_grad():
        alone = forward_logits(model, ids)
        right = forward_logits(model, torch.cat([ids, pad], 1), torch.cat([ones, zeros], 1))[:, :7]
        left = forward_logits(model, torch.cat([pad, ids], 1), torch.cat([zeros, ones], 1))[:, 4:]
    assert alone.shape == (1, 7, VOCAB)
    # fp32 rounding only: the fused attention kernel sums in an order that depends on the sequence
    # length, which moves logits of magnitude ~14 by about ten float32 ulps (1e-6 each); a padding
    # fault (a padded key attended, a position shifted) moves them by far more than this bound.
    bound = 32 * torch.finfo(torch.float32).eps * alone.abs().max()
    assert (right - alone).abs().max() < bound
    assert (left - alone).abs().max() < bound


@pytest.mark.parametrize("tied", [True, False])
def test_gradients_match_hf(hf_checkpoint, tp1, tied):
    path = hf_checkpoint("qwen3", tied)
    ids, mask = _batch(1)
    hf = _hf_model(path)
    _loss(hf(input_ids=ids, attention_mask=mask).logits, ids, mask).backward()
    model = _loaded_model(path)
    logits = forward_logits(model, ids, mask)
    # the HF vocabulary only, in [b, s] order: no copy or crop of the logits left to make
    assert logits.shape == (*ids.shape, VOCAB) and logits.is_contiguous()
    _loss(logits, ids, mask).backward()
    output_weight = (
        model.embedding.word_embeddings.weight if tied else model.output_layer.weight
    )  # its vocabulary-padding rows: no logits, no gradient
    assert output_weight.size(0) > VOCAB and not output_weight.grad[VOCAB:].any()
    grads = {}
    for name, param in model.named_parameters():
        grads.update(megatron_shards_to_hf(name, [param.grad], model.hf_arch))
    hf_grads = {name: p.grad for name, p in hf.named_parameters() if not (tied and name == "lm_head.weight")}
    assert set(grads) == set(hf_grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, hf_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def _train_step(ddp_model, optimizer, ids, mask):
    """One optimizer step on the test loss; returns the loss."""
    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()
    loss = _loss(forward_logits(ddp_model, ids, mask), ids, mask)
    loss.backward()
    ddp_model.finish_grad_sync()
    assert optimizer.step()[0]
    return loss.detach()


def test_checkpoint_resumes_exactly(hf_checkpoint, tmp_path, tp1):
    path = hf_checkpoint("llama", False)
    ids, mask = _batch(2)
    model = _loaded_model(path)
    ddp_model, optimizer = build_optimizer(model, lr=1e-2)

    def step():
        return _train_step(ddp_model, optimizer, ids, mask)

    step(), step()
    with torch.no_grad():
        logits_at_save = forward_logits(model, ids, mask)
    children_before = set(psutil.Process().children(recursive=True))  # other tests' long-lived helpers
    save_checkpoint(tmp_path / "ckpt", ddp_model, optimizer, {"last_lr": 0.01}, {"rollout_id": 7}, step=2)
    # no helper process left behind (megatron's own default starts a spawn manager that re-imports __main__)
    assert set(psutil.Process().children(recursive=True)) - children_before == set()
    draw_at_save = torch.rand(4)
    loss_after = step()
    destroy_parallel()

    init_parallel(1, seed=123)  # different seed and initial weights: everything must come from the checkpoint
    model = build_gpt_model(path)
    ddp_model, optimizer = build_optimizer(model, lr=1e-2)
    state = load_checkpoint(tmp_path / "ckpt", ddp_model, optimizer)
    assert (state["step"], state["scheduler_state"], state["extra"]) == (
        2,
        {"last_lr": 0.01},
        {"rollout_id": 7},
    )
    assert state["rng_restored"] and torch.equal(torch.rand(4), draw_at_save)
    with torch.no_grad():
        assert torch.equal(forward_logits(model, ids, mask), logits_at_save)
    assert torch.equal(step(), loss_after)
    assert read_trainer_state(tmp_path / "ckpt")["tp_size"] == 1
    with pytest.raises(FileNotFoundError, match="not a slime-wf checkpoint"):
        load_checkpoint(tmp_path, model)


def _adam_implementations(optimizer) -> set:
    return {
        (group["fused"], group["foreach"])
        for part in optimizer.chained_optimizers
        for group in part.optimizer.param_groups
    }


def test_adam_runs_torchs_fused_kernel_also_after_loading_an_older_state(hf_checkpoint, tmp_path, tp1):
    """Megatron falls back to torch's Adam without naming an implementation (on CPU torch then loops over
    tensors one at a time); slime-wf asks for the fused kernel, and a state saved without it (as by an
    earlier version) must not turn it off again: torch restores the flags a state was saved with."""
    path = hf_checkpoint("llama", False)
    ids, mask = _batch(2)
    ddp_model, optimizer = build_optimizer(_loaded_model(path), lr=1e-2)
    assert _adam_implementations(optimizer) == {(True, False)}
    for part in optimizer.chained_optimizers:
        for group in part.optimizer.param_groups:
            group.update(fused=None, foreach=None)  # torch's defaults, as Megatron builds it
    _train_step(ddp_model, optimizer, ids, mask)
    save_checkpoint(tmp_path / "old", ddp_model, optimizer, step=1)
    destroy_parallel()

    init_parallel(1, seed=123)
    ddp_model, optimizer = build_optimizer(build_gpt_model(path), lr=1e-2)
    load_checkpoint(tmp_path / "old", ddp_model, optimizer)
    assert _adam_implementations(optimizer) == {(True, False)}
    _train_step(ddp_model, optimizer, ids, mask)


def _trained_checkpoint(hf_checkpoint, path):
    """A llama model and its Adam after one step, saved at `path`, with the python and numpy
    random streams moved away from their defaults."""
    model = _loaded_model(hf_checkpoint("llama", False))
    ddp_model, optimizer = build_optimizer(model, lr=1e-2)
    ids, mask = _batch(3)
    _train_step(ddp_model, optimizer, ids, mask)
    random.seed(5)
    random.gauss(0, 1)  # python's cached Gaussian is part of its state
    np.random.seed(6)
    np.random.standard_normal()
    save_checkpoint(path, ddp_model, optimizer, step=1)
    return ddp_model, optimizer


def test_checkpoint_files_are_plain_data_and_load_weights_only(hf_checkpoint, tmp_path, tp1, monkeypatch):
    loads, real_load = [], torch.load

    def weights_only_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        if kwargs.get("weights_only") is False:  # unset means torch's default, weights_only=True
            raise AssertionError("torch.load(weights_only=False) while saving or loading a checkpoint")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", weights_only_load)
    ckpt = tmp_path / "ckpt"
    ddp_model, optimizer = _trained_checkpoint(hf_checkpoint, ckpt)
    draws = (
        random.random(),
        random.gauss(0, 1),
        np.random.rand(),
        np.random.standard_normal(),
        torch.rand(3),
    )
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    state = load_checkpoint(ckpt, ddp_model, optimizer)
    monkeypatch.undo()
    assert loads and state["rng_restored"]
    restored = (
        random.random(),
        random.gauss(0, 1),
        np.random.rand(),
        np.random.standard_normal(),
        torch.rand(3),
    )
    assert restored[:4] == draws[:4] and torch.equal(restored[4], draws[4])

    # every file is JSON, safetensors, or a pickle of tensors / plain data / torch's checkpoint metadata
    from safetensors.torch import load_file

    metadata = read_dcp_metadata(ckpt / "megatron")
    shard_files = {info.relative_path for info in metadata.storage_data.values()}
    for file in sorted(p for p in ckpt.rglob("*") if p.is_file()):
        if file.suffix == ".json":
            json.loads(file.read_text())
        elif file.suffix == ".safetensors":
            assert load_file(file)
        elif file.name == "common.pt":
            torch.load(file, weights_only=True)
        elif file.suffix == ".distcp":
            assert file.name in shard_files
        else:
            assert file.name == ".metadata", f"unexpected file {file.relative_to(ckpt)} in a checkpoint"
    for info in metadata.storage_data.values():
        blob = (ckpt / "megatron" / info.relative_path).read_bytes()[info.offset : info.offset + info.length]
        torch.load(io.BytesIO(blob), weights_only=True)
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == ["rank00000.json", "rank00000.safetensors"]


_PAYLOAD_RAN: list[str] = []


def _payload(what: str) -> None:
    _PAYLOAD_RAN.append(what)


class _Payload:
    """Unpickling this calls `_payload`: what a malicious checkpoint file would do with os.system."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __reduce__(self):
        return (_payload, (self.what,))


def test_a_tampered_or_old_checkpoint_is_refused_without_unpickling_it(hf_checkpoint, tmp_path, tp1):
    ckpt = tmp_path / "ckpt"
    ddp_model, optimizer = _trained_checkpoint(hf_checkpoint, ckpt)

    def variant(name):
        shutil.copytree(ckpt, tmp_path / name)
        return tmp_path / name

    metadata_payload = variant("metadata-payload")
    (metadata_payload / "megatron" / ".metadata").write_bytes(pickle.dumps(_Payload("metadata")))
    with pytest.raises(UnsafeCheckpointError, match="not plain torch checkpoint metadata"):
        load_checkpoint(metadata_payload, ddp_model, optimizer)

    # a sharded object (a layer's _extra_state) replaced by a payload, its metadata pointing at it
    object_payload = variant("object-payload")
    metadata = read_dcp_metadata(object_payload / "megatron")
    index = next(i for i in metadata.storage_data if "_extra_state" in i.fqn)
    info = metadata.storage_data[index]
    blob = io.BytesIO()
    torch.save([_Payload("sharded object")], blob)
    shard = object_payload / "megatron" / info.relative_path
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(blob.getvalue())
    metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(blob.getvalue()))
    (object_payload / "megatron" / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(
        UnsafeCheckpointError, match=r"_extra_state/shard_\d_\d' is not plain data .*_payload was not an"
    ):
        load_checkpoint(object_payload, ddp_model, optimizer)

    # an older checkpoint whose RNG files are pickles
    old = variant("old-format")
    trainer_state = json.loads((old / "trainer_state.json").read_text())
    (old / "trainer_state.json").write_text(
        json.dumps({**trainer_state, "format": "slime-wf-megatron-checkpoint/1"})
    )
    with pytest.raises(ValueError, match="pickled its RNG states; it is not loaded"):
        load_checkpoint(old, ddp_model, optimizer)
    pickled_rng = variant("pickled-rng")
    for file in (pickled_rng / "rng").iterdir():
        file.unlink()
    torch.save({"python": _Payload("rng")}, pickled_rng / "rng" / "rank00000.pt")
    with pytest.raises(ValueError, match="a pickled RNG state, as older slime-wf versions wrote"):
        load_checkpoint(pickled_rng, ddp_model, optimizer)
    assert _PAYLOAD_RAN == []
    assert load_checkpoint(ckpt, ddp_model, optimizer)["rng_restored"]  # the untouched one still loads


def test_megatron_schedule_runs_on_cpu(hf_checkpoint, tp1):
    """Megatron's own forward/backward schedule (what a Megatron train loop calls) trains on CPU
    exactly like a hand-written step."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    path = hf_checkpoint("qwen2", True)
    ids, mask = _batch(3)
    losses = {}
    for use_schedule in (False, True):
        destroy_parallel()
        init_parallel(1, seed=0)
        model = _loaded_model(path)
        ddp_model, optimizer = build_optimizer(model, lr=1e-2)
        model.config.finalize_model_grads_func = finalize_model_grads

        def forward_step(data, step_model):
            step_ids, step_mask = next(data)
            logits = forward_logits(step_model, step_ids, step_mask)
            return logits, lambda out: (_loss(out, step_ids, step_mask), {})

        losses[use_schedule] = []
        for _ in range(2):
            ddp_model.zero_grad_buffer()
            optimizer.zero_grad()
            if use_schedule:
                get_forward_backward_func()(
                    forward_step_func=forward_step,
                    data_iterator=iter([(ids, mask)]),
                    model=[ddp_model],
                    num_microbatches=1,
                    seq_length=ids.shape[1],
                    micro_batch_size=ids.shape[0],
                )
            else:
                _loss(forward_logits(ddp_model, ids, mask), ids, mask).backward()
                ddp_model.finish_grad_sync()
            assert optimizer.step()[0]
            with torch.no_grad():
                losses[use_schedule].append(_loss(forward_logits(model, ids, mask), ids, mask).item())
    assert losses[True] == losses[False] and losses[True][1] < losses[True][0]


def test_exported_checkpoint_loads_in_transformers(hf_checkpoint, tiny_tokenizer_dir, tmp_path, tp1):
    from transformers import AutoTokenizer

    source = make_hf_checkpoint(tmp_path / "src", "qwen2", False, seed=5, tokenizer_dir=tiny_tokenizer_dir)
    model = _loaded_model(source)
    out = tmp_path / "export"
    out.mkdir()
    (out / "stale.safetensors").write_text("replaced")
    save_hf_checkpoint(megatron_to_hf(model), source, out, max_shard_bytes=40_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and "stale.safetensors" not in shards
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()
    assert AutoTokenizer.from_pretrained(out).pad_token == "<pad>"
    ids, mask = _batch(4)
    with torch.no_grad():
        expected = _hf_model(source)(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(_hf_model(out)(input_ids=ids, attention_mask=mask).logits, expected)


def test_hf_parity_cli_rejects_bad_input(hf_checkpoint, tmp_path, capsys):
    from slime_wf_cli import build_parser

    for args, message in (
        ([str(tmp_path)], "no config.json"),
        (
            [str(hf_checkpoint("qwen2", True)), "--tp", "4"],
            "num_key_value_heads=2 is not divisible by tensor-parallel size 4",
        ),
    ):
        ns = build_parser().parse_args(["hf-parity", "--hf-checkpoint", *args])
        assert ns.func(ns) == 2
        assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU shim is inactive with CUDA")
def test_cpu_shim_patches_only_megatron_modules():
    import megatron.core.utils as megatron_utils

    cpu_shim.install()
    cpu_shim.install()  # idempotent
    assert megatron_utils.torch.cuda.current_device() == "cpu"
    assert megatron_utils.torch.zeros(2, device="cuda").device.type == "cpu"
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()  # the real torch is untouched
    assert cpu_shim.distributed_backend() == "gloo"
    with pytest.raises(ValueError, match="float32"):
        cpu_shim.check_trainable(torch.bfloat16, use_distributed_optimizer=False)


@pytest.mark.slow  # a fresh interpreter importing Megatron: seconds of the fast tier's two minutes
def test_megatron_fallback_warnings_are_silenced_only_around_its_import():
    """Importing slime_wf.training installs no process-wide warnings filter; megatron's own import, through
    `cpu_shim.import_megatron` (which the trainer's entry points call), gives no Apex / Transformer
    Engine warning and leaves no filter about them, and imports no TorchDynamo. A fresh process:
    megatron imports once."""
    code = """
import json, sys, warnings
import torch  # adds filters of its own
warnings.simplefilter("always")
before = list(warnings.filters)
import slime_wf.training
from slime_wf.training import cpu_shim
after_import = list(warnings.filters)
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    cpu_shim.import_megatron()
    import megatron.core.models.gpt.gpt_layer_specs, megatron.core.optimizer
ours = [f for f in warnings.filters if f[1] is not None and "Apex" in f[1].pattern]
from megatron.core.jit import jit_fuser
print(json.dumps({"same_at_import": before == after_import, "filters_left": len(ours),
                  "megatron": "megatron.core" in sys.modules, "warned": [str(w.message) for w in seen],
                  "dynamo": "torch._dynamo" in sys.modules, "fuser_is_compile": jit_fuser is torch.compile,
                  "compile_restored": torch.compile.__module__}))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["same_at_import"] and got["filters_left"] == 0 and got["megatron"], got
    # megatron's unused fused kernels were not handed to torch.compile, which imports TorchDynamo and
    # Inductor (seconds of every trainer start); torch.compile itself is torch's again afterwards
    assert not got["dynamo"] and not got["fuser_is_compile"], got
    assert got["compile_restored"].startswith("torch"), got
    assert not [w for w in got["warned"] if "not installed" in w], got["warned"]
