"""Megatron-core GPTModel built from a Hugging Face config (Qwen3, Qwen2, Llama families).

`describe_hf_config` reads and validates the HF config into an `Architecture` (everything the
model and the weight converter need); `build_gpt_model` turns it into a `GPTModel` with
Megatron's local (pure-torch) layer spec and fused attention (`sdpa_attention`), or into a critic
whose output layer is a `ValueHead`; `forward_logits` runs it with an explicit causal + padding
mask and position ids, and returns full-vocabulary logits with the same meaning as
the HF model's.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from slime_wf.checkpoint import layout
from slime_wf.training import cpu_shim

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama")
# Megatron's llama3 rope scaling hard-codes these; other values would silently differ from HF.
_MEGATRON_LLAMA3_ROPE = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


class UnsupportedConfigError(ValueError):
    """The HF config describes something this model builder does not implement."""


@dataclass(frozen=True)
class Architecture:
    """What slime-wf reads from an HF config: enough to build the model and convert weights."""

    model_type: str
    vocab_size: int  # HF vocabulary (rows of embed_tokens)
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # q/k/v projections carry a bias (Qwen2)
    qk_layernorm: bool  # per-head RMSNorm on queries and keys (Qwen3)
    initializer_range: float = 0.02
    rope_scaling_factor: float | None = None  # llama3 rope scaling
    linear_rope_factor: float | None = None  # "linear" rope scaling (positions divided by it)

    def padded_vocab_size(self, tp_size: int, make_vocab_size_divisible_by: int = 128) -> int:
        """Rows of Megatron's (vocab-parallel) embedding and output layer.

        Padded to a multiple of lcm(make_vocab_size_divisible_by, tp_size), so that for the
        usual power-of-two tp sizes the padding does not depend on tp and a checkpoint saved
        at one tp size loads at another.
        """
        multiple = math.lcm(make_vocab_size_divisible_by, tp_size)
        return -(-self.vocab_size // multiple) * multiple


def hf_config_dict(hf_config: Any) -> dict:
    """An HF config as a plain dict, from a checkpoint directory (its config.json), a
    `PretrainedConfig`, or a dict. Reading config.json directly keeps transformers out of the
    training processes."""
    if isinstance(hf_config, dict):
        return dict(hf_config)
    if isinstance(hf_config, str | os.PathLike):
        config = layout.hf_config(hf_config)
        if config is None:
            raise FileNotFoundError(f"no config.json in HF checkpoint directory {os.fspath(hf_config)!r}")
        return config
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise TypeError(
        f"hf_config must be a checkpoint directory, a PretrainedConfig or a dict, got {type(hf_config)!r}"
    )


def _rope_settings(cfg: dict) -> tuple[float, float | None, float | None]:
    """(rope_theta, llama3 factor, linear factor) from either config style: transformers 5
    `rope_parameters`, or 4.x `rope_theta` + `rope_scaling`."""
    params = cfg.get("rope_parameters")
    field = "rope_parameters"
    if params is None:
        params = dict(cfg.get("rope_scaling") or {})
        params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
        field = "rope_scaling"
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise UnsupportedConfigError(f"HF config partial_rotary_factor={partial} is not supported (only 1.0)")
    if rope_type == "default":
        return theta, None, None
    if rope_type == "linear":
        return theta, None, float(params["factor"])
    if rope_type == "llama3":
        for key, expected in _MEGATRON_LLAMA3_ROPE.items():
            if float(params.get(key, expected)) != expected:
                raise UnsupportedConfigError(
                    f"HF config {field}.{key}={params.get(key)} is not supported for rope_type 'llama3' "
                    f"(Megatron's llama3 scaling fixes it to {expected})"
                )
        return theta, float(params["factor"]), None
    raise UnsupportedConfigError(
        f"HF config {field}.rope_type={rope_type!r} is not supported; supported: 'default', 'linear', 'llama3'"
    )


def describe_hf_config(hf_config: Any) -> Architecture:
    """Validate an HF config and return its `Architecture`; unsupported features raise
    `UnsupportedConfigError` naming the config field."""
    cfg = hf_config_dict(hf_config)
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedConfigError(
            f"HF config model_type={model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    for field in ("num_experts", "num_local_experts", "n_routed_experts"):
        if cfg.get(field):
            raise UnsupportedConfigError(
                f"HF config {field}={cfg[field]}: mixture-of-experts models are not supported"
            )
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedConfigError(
            f"HF config hidden_act={cfg['hidden_act']!r} is not supported (only 'silu', SwiGLU)"
        )
    if cfg.get("use_sliding_window") and cfg.get("sliding_window"):
        raise UnsupportedConfigError(
            f"HF config use_sliding_window=True (sliding_window={cfg['sliding_window']}) is not supported"
        )
    other = sorted({t for t in cfg.get("layer_types") or [] if t != "full_attention"})
    if other:
        raise UnsupportedConfigError(
            f"HF config layer_types contains {other}: only 'full_attention' layers are supported"
        )
    # Qwen3 and Llama put attention_bias on o_proj as well, which Megatron's add_qkv_bias does not cover.
    if model_type != "qwen2" and cfg.get("attention_bias"):
        raise UnsupportedConfigError(
            f"HF config attention_bias=True is not supported for model_type={model_type!r}"
        )
    if cfg.get("mlp_bias"):
        raise UnsupportedConfigError("HF config mlp_bias=True is not supported")
    if cfg.get("pretraining_tp") not in (None, 1):
        raise UnsupportedConfigError(
            f"HF config pretraining_tp={cfg['pretraining_tp']} is not supported (only 1)"
        )
    missing = [
        k
        for k in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
        )
        if cfg.get(k) is None
    ]
    if missing:
        raise UnsupportedConfigError(f"HF config lacks {missing}")
    theta, llama3_factor, linear_factor = _rope_settings(cfg)
    heads = int(cfg["num_attention_heads"])
    return Architecture(
        model_type=model_type,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
        intermediate_size=int(cfg["intermediate_size"]),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        # the default of the Qwen3, Qwen2 and Llama config classes
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
        qk_layernorm=model_type == "qwen3",
        initializer_range=float(cfg.get("initializer_range", 0.02)),
        rope_scaling_factor=llama3_factor,
        linear_rope_factor=linear_factor,
    )


def check_tp_size(arch: Architecture, tp_size: int) -> None:
    """Megatron splits heads, query groups and the MLP across ranks: each must divide evenly."""
    for name, value in (
        ("num_attention_heads", arch.num_attention_heads),
        ("num_key_value_heads", arch.num_key_value_heads),
        ("intermediate_size", arch.intermediate_size),
    ):
        if value % tp_size:
            raise UnsupportedConfigError(
                f"HF config {name}={value} is not divisible by tensor-parallel size {tp_size}"
            )


def build_gpt_model(
    hf_config: Any,
    *,
    params_dtype: torch.dtype = torch.float32,
    make_vocab_size_divisible_by: int = 128,
    value_head: bool = False,
    **config_overrides,
):
    """A Megatron `GPTModel` with the architecture of `hf_config` (random weights).

    With `value_head`, the output layer is a zero hidden -> 1 `ValueHead` (a critic, see `critic.py`):
    the model's "logits" are then values `[b, s, 1]`.

    Call after `init_parallel`: the tensor-parallel size comes from Megatron's parallel state.
    `config_overrides` go to `TransformerConfig` (e.g. `recompute_granularity`).
    The model carries its `Architecture` as `model.hf_arch` (used by the weight converter and
    by `forward_logits` to crop the vocabulary padding).
    """
    cpu_shim.install()  # before megatron's first import (see cpu_shim.import_megatron)
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    arch = describe_hf_config(hf_config)
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    check_tp_size(arch, tp_size)
    if params_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"params_dtype must be float32, bfloat16 or float16, got {params_dtype}")
    options = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_key_value_heads,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        init_method_std=arch.initializer_range,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        tensor_model_parallel_size=tp_size,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        cuda_graph_scope=[],  # megatron's default ("full") only triggers its own deprecation warning
        **cpu_shim.transformer_config_options(),
    )
    options.update(config_overrides)
    config = TransformerConfig(**options)
    layer_spec = get_gpt_layer_local_spec(qk_layernorm=arch.qk_layernorm, normalization="RMSNorm")
    # The local spec's unfused attention materializes the scores; the fused kernel computes the same.
    from slime_wf.training.sdpa_attention import SdpaAttention

    layer_spec.submodules.self_attention.submodules.core_attention = SdpaAttention
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=arch.padded_vocab_size(tp_size, make_vocab_size_divisible_by),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=True,
        post_process=True,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings and not value_head,
        position_embedding_type="rope",
        rotary_base=arch.rope_theta,
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0,
        seq_len_interpolation_factor=arch.linear_rope_factor,
    )
    # The local spec's norms are plain torch.nn.RMSNorm, created in fp32 whatever params_dtype is.
    for module in model.modules():
        if isinstance(module, torch.nn.RMSNorm):
            module.to(params_dtype)
    model.hf_arch = arch
    model.make_vocab_size_divisible_by = make_vocab_size_divisible_by
    if value_head:
        attach_value_head(model)
    elif tp_size == 1 and model.output_layer.bias is None:
        model.output_layer.__class__ = _hf_vocab_output_layer()
        model.output_layer.hf_vocab_size = arch.vocab_size
    return model


@functools.cache
def _hf_vocab_output_layer() -> type:
    """GPTModel's output layer at tensor-parallel size 1, computing logits the way the loss reads them.

    Megatron's own computes `[s, b, padded vocabulary]` logits, which `GPTModel` then copies to
    `[b, s, ...]` and `forward_logits` crops to the HF vocabulary: two passes over the largest
    tensor of a step, each again in backward (with a zero-filled gradient for the padding rows).
    This one multiplies the hidden states in `[b, s]` order by the HF vocabulary's rows of the
    weight only, and hands GPTModel a transposed view whose `contiguous()` is then free. Same
    parameters, same state dict: `build_gpt_model` swaps the class of the layer Megatron built.
    """
    from megatron.core.tensor_parallel import ColumnParallelLinear

    class HfVocabOutputLayer(ColumnParallelLinear):
        hf_vocab_size: int

        def forward(self, input_, weight=None, runtime_gather_output=None):
            weight = self.weight if weight is None else weight
            logits = torch.nn.functional.linear(input_.transpose(0, 1), weight[: self.hf_vocab_size])
            return logits.transpose(0, 1), None

    return HfVocabOutputLayer


class ValueHead(torch.nn.Module):
    """hidden -> 1, in the place of GPTModel's output layer (same call signature): a critic's head.

    Its weight is replicated on every tensor-parallel rank: it reads the final hidden state, which
    every rank holds whole, so all ranks compute the same gradient and need no reduction, and a
    checkpoint of it loads at any TP size."""

    def __init__(self, hidden_size: int, dtype: torch.dtype, device: torch.device | None = None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, hidden_size, dtype=dtype, device=device))

    def forward(
        self,
        hidden_states: torch.Tensor,
        weight: torch.Tensor | None = None,
        runtime_gather_output: bool | None = None,
    ) -> tuple[torch.Tensor, None]:
        return torch.nn.functional.linear(hidden_states, self.weight), None


def attach_value_head(model) -> None:
    """Replace a GPTModel's output layer by a zero `ValueHead` (the model must not tie its
    output layer to the embedding: build it with `value_head=True`)."""
    if model.share_embeddings_and_output_weights:
        raise ValueError("a value head needs an untied output layer; build the model with value_head=True")
    device = model.embedding.word_embeddings.weight.device
    model.output_layer = ValueHead(model.config.hidden_size, model.config.params_dtype, device)
    model.is_critic = True


def unwrap_model(model):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while not hasattr(model, "hf_arch") and hasattr(model, "module"):
        model = model.module
    if not hasattr(model, "hf_arch"):
        raise TypeError(f"{type(model).__name__} was not built by build_gpt_model (no hf_arch)")
    return model


def causal_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Megatron's attention mask from an HF-style [b, s] mask (1 = token, 0 = padding).

    Returns a boolean [b, 1, s, s] tensor, True where attention is *not* allowed: future
    positions and padding keys. Passing it explicitly also keeps Megatron from building its
    default mask on a CUDA device.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [batch, seq], got shape {tuple(attention_mask.shape)}")
    seq = attention_mask.shape[1]
    future = torch.triu(torch.ones(seq, seq, dtype=torch.bool, device=attention_mask.device), diagonal=1)
    padding_key = ~attention_mask.bool()
    return (future[None, :, :] | padding_key[:, None, :])[:, None, :, :]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only (0, 1, ... from the first token), so a padded
    sequence sees the same positions as its unpadded self, whichever side the padding is on."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def forward_logits(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits [b, s, vocab] for `input_ids` [b, s], over the HF vocabulary (padding rows cropped).

    At tensor-parallel size > 1 the vocab-parallel logits are gathered (differentiably), so
    every rank gets the full logits. Padding positions get logits too; ignore them.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids shape {tuple(input_ids.shape)}"
        )
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    vocab_size = unwrap_model(model).hf_arch.vocab_size
    logits = model(input_ids, position_ids, causal_padding_mask(attention_mask), runtime_gather_output=True)
    # at tensor-parallel size 1 the output layer computes the HF vocabulary only (no slice to take)
    return logits if logits.size(-1) == vocab_size else logits[..., :vocab_size]
