"""Tiny HF checkpoints for the Megatron tests (built offline with transformers), and snapshots of
a model's parameters and optimizer state to compare bit for bit."""

from __future__ import annotations

import shutil
from pathlib import Path

VOCAB = 130  # not a multiple of 128: exercises Megatron's vocabulary padding and the crop


def tiny_hf_config(family: str, tied: bool, **overrides):
    """2 layers, hidden 64, 4 query heads in 2 groups; Qwen3 with head_dim 32 (not hidden/heads)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=5000.0,
        tie_word_embeddings=tied,
    )
    common.update(overrides)
    if family == "qwen3":
        return Qwen3Config(**{"head_dim": 32, **common})
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "llama":
        return LlamaConfig(**common)
    raise ValueError(family)


def make_hf_checkpoint(
    out: Path,
    family: str,
    tied: bool,
    *,
    seed: int = 0,
    tokenizer_dir: Path | None = None,
    **config_overrides,
) -> Path:
    """Save a random fp32 model of `family`; weights are widened so logits span several units
    (the default init gives near-uniform logits, which would make a parity check weak)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        tiny_hf_config(family, tied, **config_overrides), dtype=torch.float32
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.normal_(0.0, 0.2)
            else:
                param.normal_(0.0, 0.5 if "embed" in name or "lm_head" in name else 0.15)
    model.save_pretrained(out)
    if tokenizer_dir is not None:
        for path in Path(tokenizer_dir).iterdir():
            shutil.copy2(path, out / path.name)
    return out


def _tensors(obj, prefix=""):
    """Every tensor in a nested dict/list (an optimizer's state dict), by path, cloned."""
    import torch

    if isinstance(obj, torch.Tensor):
        return {prefix: obj.detach().clone()}
    out = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(_tensors(value, f"{prefix}/{key}"))
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            out.update(_tensors(value, f"{prefix}/{i}"))
    return out


def snapshot(ddp_model, optimizer):
    """Parameters and Adam state (exp_avg, exp_avg_sq, step) as cloned tensors."""
    state = {f"param/{name}": p.detach().clone() for name, p in ddp_model.named_parameters()}
    state.update({f"adam{k}": v for k, v in _tensors(optimizer.state_dict()).items()})
    return state


def assert_unchanged_and_finite(before, after):
    """Every tensor of `after` (a `snapshot`) bit-identical to `before`'s, and finite."""
    import torch

    assert before.keys() == after.keys()
    assert any(k.startswith("adam") and "exp_avg" in k for k in before)  # Adam state was there to compare
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
        if value.is_floating_point():
            assert torch.isfinite(after[key]).all(), key
