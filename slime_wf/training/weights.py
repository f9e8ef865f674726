"""HF <-> Megatron weight conversion at any tensor-parallel size.

Megatron's local layer spec keeps the RMSNorms as their own modules (`input_layernorm`,
`pre_mlp_layernorm`), so the norms map one to one. What differs from HF:

- `self_attention.linear_qkv` fuses q, k and v, ordered per query group: for each of the
  `num_key_value_heads` groups, its `heads/groups` query heads, then its key head, then its
  value head. Tensor parallelism gives each rank a contiguous run of whole groups.
- `mlp.linear_fc1` fuses gate and up; each rank holds [its slice of gate; its slice of up].
- column-parallel weights (qkv, fc1, embedding, output layer) split on dim 0, row-parallel
  weights (`linear_proj`, `linear_fc2`) on dim 1; norms are replicated.
- the embedding and output layer have `Architecture.padded_vocab_size` rows; the padding
  rows are zero on import and cropped on export.

Conversion never changes a value: export(import(w)) equals w bit for bit in the same dtype.

Size: one module over 400 lines because the name map, the qkv/fc1 fusion and the TP split are one
bijection: import and export sit together so that the round trip can be read (and checked) in one place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from slime_wf.checkpoint.layout import hf_quantization_config
from slime_wf.training.model import Architecture, check_tp_size, describe_hf_config, unwrap_model

logger = logging.getLogger(__name__)

# HF checkpoint entries that carry no weights of ours (old checkpoints saved rotary buffers).
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)
_WEIGHT_FILE_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".h5",
    ".msgpack",
    ".gguf",
    ".safetensors.index.json",
    ".bin.index.json",
)


def _hf_layer(i: int) -> str:
    return f"model.layers.{i}"


def _mg_layer(i: int) -> str:
    return f"decoder.layers.{i}"


def _shard(tensor: torch.Tensor, tp_rank: int, tp_size: int, dim: int) -> torch.Tensor:
    return tensor.chunk(tp_size, dim=dim)[tp_rank]


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


def _fuse_qkv(q, k, v, arch: Architecture, tp_rank: int, tp_size: int) -> torch.Tensor:
    """HF q/k/v (weights [out, hidden] or biases [out]) -> this rank's rows of linear_qkv."""
    groups, d = arch.num_key_value_heads, arch.head_dim
    trailing = q.shape[1:]
    q = q.reshape(groups, -1, *trailing)  # [groups, heads_per_group * d, ...]
    k = k.reshape(groups, d, *trailing)
    v = v.reshape(groups, d, *trailing)
    fused = torch.cat([q, k, v], dim=1)
    per_rank = groups // tp_size
    return fused[tp_rank * per_rank : (tp_rank + 1) * per_rank].reshape(-1, *trailing)


def _split_qkv(fused: torch.Tensor, arch: Architecture) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full (all ranks concatenated) linear_qkv rows -> HF q, k, v."""
    groups, d = arch.num_key_value_heads, arch.head_dim
    q_rows = arch.num_attention_heads // groups * d
    trailing = fused.shape[1:]
    grouped = fused.reshape(groups, q_rows + 2 * d, *trailing)
    q, k, v = grouped.split([q_rows, d, d], dim=1)
    return q.reshape(-1, *trailing), k.reshape(-1, *trailing), v.reshape(-1, *trailing)


def _as_architecture(hf_config) -> Architecture:
    return hf_config if isinstance(hf_config, Architecture) else describe_hf_config(hf_config)


def hf_to_megatron(
    hf_state: Mapping[str, torch.Tensor],
    hf_config,
    tp_rank: int,
    tp_size: int,
    *,
    make_vocab_size_divisible_by: int = 128,
) -> dict[str, torch.Tensor]:
    """This tensor-parallel rank's Megatron parameters (local names, local shards) from HF weights.

    `hf_state` may be any mapping (a lazy one reads tensors on demand). Every HF entry must be
    used: a missing one raises KeyError, an unknown one ValueError, both naming the entries.
    """
    arch = _as_architecture(hf_config)
    check_tp_size(arch, tp_size)
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank} is outside tensor-parallel size {tp_size}")
    used: set[str] = set()

    def get(name: str) -> torch.Tensor:
        if name not in hf_state:
            raise KeyError(f"HF weights have no {name!r} (needed for model_type={arch.model_type!r})")
        used.add(name)
        return hf_state[name]

    padded_vocab = arch.padded_vocab_size(tp_size, make_vocab_size_divisible_by)
    out: dict[str, torch.Tensor] = {
        "embedding.word_embeddings.weight": _shard(
            _pad_rows(get("model.embed_tokens.weight"), padded_vocab), tp_rank, tp_size, 0
        ),
        "decoder.final_layernorm.weight": get("model.norm.weight"),
    }
    if not arch.tie_word_embeddings:
        out["output_layer.weight"] = _shard(
            _pad_rows(get("lm_head.weight"), padded_vocab), tp_rank, tp_size, 0
        )
    elif "lm_head.weight" in hf_state:
        used.add("lm_head.weight")  # tied: some checkpoints store the shared matrix twice
    for i in range(arch.num_layers):
        hf, mg = _hf_layer(i), _mg_layer(i)
        attn = f"{hf}.self_attn"
        out[f"{mg}.input_layernorm.weight"] = get(f"{hf}.input_layernorm.weight")
        out[f"{mg}.pre_mlp_layernorm.weight"] = get(f"{hf}.post_attention_layernorm.weight")
        out[f"{mg}.self_attention.linear_qkv.weight"] = _fuse_qkv(
            get(f"{attn}.q_proj.weight"),
            get(f"{attn}.k_proj.weight"),
            get(f"{attn}.v_proj.weight"),
            arch,
            tp_rank,
            tp_size,
        )
        if arch.qkv_bias:
            out[f"{mg}.self_attention.linear_qkv.bias"] = _fuse_qkv(
                get(f"{attn}.q_proj.bias"),
                get(f"{attn}.k_proj.bias"),
                get(f"{attn}.v_proj.bias"),
                arch,
                tp_rank,
                tp_size,
            )
        if arch.qk_layernorm:
            out[f"{mg}.self_attention.q_layernorm.weight"] = get(f"{attn}.q_norm.weight")
            out[f"{mg}.self_attention.k_layernorm.weight"] = get(f"{attn}.k_norm.weight")
        out[f"{mg}.self_attention.linear_proj.weight"] = _shard(
            get(f"{attn}.o_proj.weight"), tp_rank, tp_size, 1
        )
        out[f"{mg}.mlp.linear_fc1.weight"] = torch.cat(
            [
                _shard(get(f"{hf}.mlp.gate_proj.weight"), tp_rank, tp_size, 0),
                _shard(get(f"{hf}.mlp.up_proj.weight"), tp_rank, tp_size, 0),
            ]
        )
        out[f"{mg}.mlp.linear_fc2.weight"] = _shard(get(f"{hf}.mlp.down_proj.weight"), tp_rank, tp_size, 1)
    unused = sorted(k for k in hf_state if k not in used and not k.endswith(_IGNORED_HF_SUFFIXES))
    if unused:
        raise ValueError(
            f"HF weights have {len(unused)} entries that model_type={arch.model_type!r} does not use "
            f"(a different architecture or config?): {unused[:8]}"
        )
    return out


def megatron_shards_to_hf(
    name: str, shards: list[torch.Tensor], arch: Architecture
) -> list[tuple[str, torch.Tensor]]:
    """HF (name, full tensor) pairs for one Megatron parameter given its shard from every TP rank."""
    tp_size = len(shards)
    if name == "embedding.word_embeddings.weight":
        return [("model.embed_tokens.weight", torch.cat(shards)[: arch.vocab_size])]
    if name == "output_layer.weight":
        return [("lm_head.weight", torch.cat(shards)[: arch.vocab_size])]
    if name == "decoder.final_layernorm.weight":
        return [("model.norm.weight", shards[0])]
    parts = name.split(".")
    if parts[:2] != ["decoder", "layers"]:
        raise ValueError(f"no HF name for Megatron parameter {name!r}")
    hf = _hf_layer(int(parts[2]))
    rest = ".".join(parts[3:])
    if rest == "input_layernorm.weight":
        return [(f"{hf}.input_layernorm.weight", shards[0])]
    if rest == "pre_mlp_layernorm.weight":
        return [(f"{hf}.post_attention_layernorm.weight", shards[0])]
    if rest in ("self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"):
        return [(f"{hf}.self_attn.{rest.split('.')[1][0]}_norm.weight", shards[0])]
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        q, k, v = _split_qkv(torch.cat(shards), arch)
        return [(f"{hf}.self_attn.{p}_proj.{kind}", t) for p, t in zip("qkv", (q, k, v), strict=True)]
    if rest == "self_attention.linear_proj.weight":
        return [(f"{hf}.self_attn.o_proj.weight", torch.cat(shards, dim=1))]
    if rest == "mlp.linear_fc1.weight":
        halves = [s.chunk(2, dim=0) for s in shards]
        gate = torch.cat([h[0] for h in halves])
        up = torch.cat([h[1] for h in halves])
        return [(f"{hf}.mlp.gate_proj.weight", gate), (f"{hf}.mlp.up_proj.weight", up)]
    if rest == "mlp.linear_fc2.weight":
        return [(f"{hf}.mlp.down_proj.weight", torch.cat(shards, dim=1))]
    raise ValueError(f"no HF name for Megatron parameter {name!r} (tp_size={tp_size})")


def _tp_shards(param: torch.Tensor) -> list[torch.Tensor]:
    """The same parameter from every tensor-parallel rank (replicated ones are not gathered)."""
    from megatron.core import parallel_state

    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return [param.detach()]
    local = param.detach().contiguous()
    shards = [torch.empty_like(local) for _ in range(tp_size)]
    torch.distributed.all_gather(shards, local, group=parallel_state.get_tensor_model_parallel_group())
    return shards


def iter_hf_weights(model, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full CPU tensor) for every weight, gathering shards over the TP group.

    A collective: every tensor-parallel rank must iterate it in step, and every rank receives
    the full tensors. Tensors are cast to `dtype` when given (the model's dtype otherwise).
    """
    gpt = unwrap_model(model)
    arch: Architecture = gpt.hf_arch
    for name, param in gpt.named_parameters():
        for hf_name, tensor in megatron_shards_to_hf(name, _tp_shards(param), arch):
            # A copy, never a view: views would alias the live parameter (or q/k/v each other).
            yield (
                hf_name,
                tensor.to(device="cpu", dtype=dtype or tensor.dtype).clone(
                    memory_format=torch.contiguous_format
                ),
            )


def megatron_to_hf(model, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All weights as HF-named full CPU tensors, on every rank (see `iter_hf_weights`)."""
    return dict(iter_hf_weights(model, dtype))


class SafetensorsCheckpoint(Mapping):
    """An HF checkpoint directory's safetensors weights as a lazy name -> tensor mapping."""

    def __init__(self, hf_dir: str | os.PathLike):
        from safetensors import safe_open

        self.root = Path(hf_dir)
        index = self.root / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.root.glob("*.safetensors"))
            weight_map = None
        if not files:
            found = sorted(p.name for p in self.root.iterdir()) if self.root.is_dir() else "no such directory"
            raise FileNotFoundError(
                f"no *.safetensors weights in HF checkpoint {str(self.root)!r} (found: {found}); "
                "convert .bin checkpoints to safetensors first"
            )
        self._handles = {f: safe_open(str(self.root / f), framework="pt") for f in files}
        if weight_map is None:
            weight_map = {k: f for f, h in self._handles.items() for k in h.keys()}
        self._where = weight_map

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].get_tensor(name)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


class DequantizedCheckpoint(Mapping):
    """An FP8 HF checkpoint's weights as plain float32 tensors, dequantized one at a time on access;
    the scale tensors are consumed and do not appear as names."""

    def __init__(self, hf_dir: str | os.PathLike, quantization_config: Mapping):
        self.raw = SafetensorsCheckpoint(hf_dir)
        self.quantization_config = dict(quantization_config)
        self._names = [
            n for n in self.raw if not n.endswith((".weight_scale", ".weight_scale_inv", ".input_scale"))
        ]

    def __getitem__(self, name: str) -> torch.Tensor:
        from slime_wf.checkpoint.fp8 import FP8_DTYPE, dequantize_state_dict

        tensor = self.raw[name]
        if tensor.dtype != FP8_DTYPE:
            return tensor
        pair = {
            name: tensor,
            **{name + s: self.raw[name + s] for s in ("_scale_inv", "_scale") if name + s in self.raw},
        }
        try:
            return dequantize_state_dict(pair, self.quantization_config, dtype=torch.float32)[name]
        except ValueError as err:
            raise ValueError(f"{self.raw.root}: {err}") from err

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def open_hf_weights(hf_dir: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    """The weights of an HF checkpoint by name; an FP8 checkpoint's come back dequantized (lossy: FP8
    rounding is not undone)."""
    quant = hf_quantization_config(hf_dir)
    return DequantizedCheckpoint(hf_dir, quant) if quant else SafetensorsCheckpoint(hf_dir)


@torch.no_grad()
def load_hf_checkpoint_into(model, hf_dir: str | os.PathLike) -> None:
    """Copy an HF checkpoint's weights into a model built by `build_gpt_model` (this rank's shards).

    An FP8 checkpoint is dequantized, with a warning: the model gets the FP8-rounded weights.
    Load before creating a mixed-precision optimizer: it keeps its own fp32 copies of the
    parameters, taken when it is built.
    """
    from megatron.core import parallel_state

    gpt = unwrap_model(model)
    weights = open_hf_weights(hf_dir)
    if isinstance(weights, DequantizedCheckpoint):
        logger.warning(
            "%s is an FP8 checkpoint: loading its dequantized weights, which keep FP8's rounding error "
            "(lossy); give the BF16 checkpoint to load the original weights",
            hf_dir,
        )
    converted = hf_to_megatron(
        weights,
        gpt.hf_arch,
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
        make_vocab_size_divisible_by=gpt.make_vocab_size_divisible_by,
    )
    params = dict(gpt.named_parameters())
    if getattr(gpt, "is_critic", False):  # the value head is the critic's own; the body comes from HF
        converted.pop("output_layer.weight", None)
        params.pop("output_layer.weight")
    if set(params) != set(converted):
        raise ValueError(
            f"converted HF weights do not match the model: missing {sorted(set(params) - set(converted))}, "
            f"unexpected {sorted(set(converted) - set(params))}"
        )
    for name, param in params.items():
        value = converted[name]
        if value.shape != param.shape:
            raise ValueError(
                f"{name}: HF weights give shape {tuple(value.shape)}, the model has {tuple(param.shape)}"
            )
        param.copy_(value)
    logger.info("loaded %d tensors from %s", len(params), hf_dir)


def save_hf_checkpoint(
    state: Mapping[str, torch.Tensor],
    config_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """Write `state` as an HF checkpoint: safetensors (sharded with an index above
    `max_shard_bytes`) plus every non-weight file of `config_dir` (config, generation config,
    tokenizer, chat template). The directory appears complete or not at all; an existing
    `out_dir` is replaced.
    """
    from safetensors.torch import save_file

    config_dir, out_dir = Path(config_dir), Path(out_dir)
    if not (config_dir / "config.json").is_file():
        raise FileNotFoundError(f"config_dir {str(config_dir)!r} has no config.json")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        for path in sorted(config_dir.iterdir()):
            if path.is_file() and not path.name.endswith(_WEIGHT_FILE_SUFFIXES):
                shutil.copy2(path, tmp / path.name)
        config = json.loads((tmp / "config.json").read_text())
        if config.pop("quantization_config", None) is not None:
            # `state` holds plain weights: a config copied from an FP8 checkpoint must not claim otherwise
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, tensor in state.items():
            nbytes = tensor.numel() * tensor.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = tensor.detach().to("cpu").contiguous()
            size += nbytes
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / file), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, file))
            total = sum(t.numel() * t.element_size() for t in state.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            )
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir
