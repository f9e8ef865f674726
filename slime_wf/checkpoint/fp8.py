"""The FP8 (e4m3) weight format SGLang loads, and the tensor-level quantizers.

Three scale layouts, as slime's `tools/convert_hf_to_fp8.py` writes them and SGLang's FP8 and
compressed-tensors loaders read them:

- block: `<m>.weight` float8_e4m3fn [N, K] and `<m>.weight_scale_inv` float32
  [ceil(N/bn), ceil(K/bk)]; config `{"quant_method": "fp8", "weight_block_size": [bn, bk], ...}`.
- tensor: `<m>.weight` float8_e4m3fn and `<m>.weight_scale` float32 [1]; the same config without a
  block size.
- channel: `<m>.weight` float8_e4m3fn and `<m>.weight_scale` float32 [N, 1]; a compressed-tensors
  config (`"quant_method": "compressed-tensors"`, `"format": "float-quantized"`, weights strategy
  "channel").

In every layout the stored scale multiplies: w ≈ fp8 × scale, where scale = amax / 448 over the
block, row or tensor, so that the largest magnitude lands on e4m3's largest finite value. (The
block layout calls it `weight_scale_inv` after DeepSeek's checkpoints; it is the same multiplier.)

`quantize_*` / `dequantize_*` work on one tensor and are what weight sync into an FP8 engine reuses;
`dequantize_state_dict` turns a whole loaded FP8 checkpoint back into plain weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
STRATEGIES = ("block", "channel", "tensor")
DEFAULT_BLOCK_SIZE = (128, 128)
QUANTIZABLE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# An all-zero group would get scale 0 and quantize as 0/0 = NaN; flooring its amax keeps the scale a
# normal float32 (1e-12 / 448 ≈ 2e-15) and the group quantizes to exact zeros.
AMAX_FLOOR = 1e-12

# Work on ~1M elements at a time in one reused float32 buffer (4 MiB): it stays in cache through the
# max, divide, clamp and cast passes, and no pages are faulted in per chunk. Measured ~4x faster per
# core than whole-tensor passes with fresh temporaries (abs, pad, divide into new tensors).
_CHUNK_ELEMENTS = 1 << 20

# Modules that stay in high precision. Published FP8 checkpoints (Qwen3-*-FP8, DeepSeek-V3) and
# slime's converter keep embeddings, norms, the output head, MoE routers / gates and the MTP and
# DSA-indexer projections unquantized; SGLang builds those layers without an FP8 method.
_KEEP_SUBSTRINGS = ("embed", "norm", "lm_head")
_KEEP_COMPONENTS = frozenset(
    {"gate", "router", "shared_expert_gate", "score", "wte", "wpe", "eh_proj", "weights_proj"}
)
# Vision / audio towers: SGLang's encoders are often built without a quant config.
_KEEP_COMPONENT_PREFIXES = ("visual", "vision", "audio", "mm_projector", "multi_modal_projector")


# ---- quantize ----------------------------------------------------------------------------------


def quantize_block_fp8(
    w: torch.Tensor, block_size: tuple[int, int] | list[int] = DEFAULT_BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 [N, K], scale_inv float32 [ceil(N/bn), ceil(K/bk)]) with one scale per bn×bk block.

    Shapes that are not multiples of the block are zero-padded internally (zeros never raise a
    block's amax) and cropped back.
    """
    bn, bk = check_block_size(block_size)
    _check_weight(w, "quantize_block_fp8")
    n, k = w.shape
    n_blocks, k_blocks = math.ceil(n / bn), math.ceil(k / bk)
    q = torch.empty((n, k), dtype=FP8_DTYPE)
    scale_inv = torch.empty((n_blocks, k_blocks), dtype=torch.float32)
    step = bn * max(1, _CHUNK_ELEMENTS // (bn * k_blocks * bk))  # whole block rows per chunk
    # The padding columns are zero once and stay zero (0 / s = 0); padding rows are zeroed per chunk.
    buf = torch.zeros((min(step, n_blocks * bn), k_blocks * bk), dtype=torch.float32)
    for r0 in range(0, n, step):
        rows = w[r0 : r0 + step]
        r = rows.shape[0]
        x = buf[: math.ceil(r / bn) * bn]
        x[:r, :k].copy_(rows)
        x[r:].zero_()
        blocks = x.view(-1, bn, k_blocks, bk)
        amax = torch.maximum(blocks.amax(dim=1), blocks.amin(dim=1).neg_()).amax(dim=2)
        _check_finite(amax, "quantize_block_fp8")
        scale = amax.clamp_(min=AMAX_FLOOR).div_(FP8_MAX)
        blocks.div_(scale[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX)
        q[r0 : r0 + r] = x[:r, :k]
        scale_inv[r0 // bn : r0 // bn + scale.shape[0]] = scale
    return q, scale_inv


def quantize_channel_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 [N, K], scale float32 [N, 1]) with one scale per output channel (row)."""
    _check_weight(w, "quantize_channel_fp8")
    n, k = w.shape
    q = torch.empty((n, k), dtype=FP8_DTYPE)
    scale = torch.empty((n, 1), dtype=torch.float32)
    step = max(1, _CHUNK_ELEMENTS // k)
    buf = torch.empty((min(step, n), k), dtype=torch.float32)
    for r0 in range(0, n, step):
        rows = w[r0 : r0 + step]
        x = buf[: rows.shape[0]]
        x.copy_(rows)
        amax = torch.maximum(x.amax(dim=1), x.amin(dim=1).neg_())
        _check_finite(amax, "quantize_channel_fp8")
        s = amax.clamp_(min=AMAX_FLOOR).div_(FP8_MAX)
        x.div_(s[:, None]).clamp_(-FP8_MAX, FP8_MAX)
        q[r0 : r0 + x.shape[0]] = x
        scale[r0 : r0 + x.shape[0], 0] = s
    return q, scale


def quantize_tensor_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 [N, K], scale float32 [1]) with one scale for the whole tensor."""
    _check_weight(w, "quantize_tensor_fp8")
    n, k = w.shape
    lo, hi = torch.aminmax(w)  # exact in the input dtype
    amax = torch.maximum(hi.float(), -lo.float())
    _check_finite(amax, "quantize_tensor_fp8")
    s = amax.clamp(min=AMAX_FLOOR) / FP8_MAX
    q = torch.empty((n, k), dtype=FP8_DTYPE)
    step = max(1, _CHUNK_ELEMENTS // k)
    buf = torch.empty((min(step, n), k), dtype=torch.float32)
    for r0 in range(0, n, step):
        rows = w[r0 : r0 + step]
        x = buf[: rows.shape[0]]
        x.copy_(rows)
        q[r0 : r0 + x.shape[0]] = x.div_(s).clamp_(-FP8_MAX, FP8_MAX)
    return q, s.reshape(1)


def quantize_fp8(
    w: torch.Tensor, strategy: str = "block", block_size: tuple[int, int] | list[int] = DEFAULT_BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, scale) for `strategy`; store the scale under `scale_name(weight_name, strategy)`."""
    check_strategy(strategy)
    if strategy == "block":
        return quantize_block_fp8(w, block_size)
    if strategy == "channel":
        return quantize_channel_fp8(w)
    return quantize_tensor_fp8(w)


def scale_name(weight_name: str, strategy: str) -> str:
    """Checkpoint name of the scale that goes with `weight_name` (`x.weight` → `x.weight_scale_inv` / `x.weight_scale`)."""
    check_strategy(strategy)
    if not weight_name.endswith(".weight"):
        raise ValueError(f"scale_name: {weight_name!r} is not a `.weight` tensor name")
    return weight_name + ("_scale_inv" if strategy == "block" else "_scale")


# ---- dequantize --------------------------------------------------------------------------------


def dequantize_block_fp8(
    fp8: torch.Tensor,
    scale_inv: torch.Tensor,
    block_size: tuple[int, int] | list[int] = DEFAULT_BLOCK_SIZE,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """fp8 × scale_inv per bn×bk block, as `dtype`."""
    bn, bk = check_block_size(block_size)
    _check_fp8(fp8, "dequantize_block_fp8")
    n, k = fp8.shape
    expected = (math.ceil(n / bn), math.ceil(k / bk))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"dequantize_block_fp8: scale_inv has shape {list(scale_inv.shape)} but a [{n}, {k}] weight with "
            f"{bn}x{bk} blocks needs {list(expected)}; check weight_block_size"
        )
    s = scale_inv.to(torch.float32).repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return (fp8.to(torch.float32) * s).to(dtype)


def dequantize_channel_fp8(
    fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """fp8 × scale per output channel (scale [N, 1] or [N]), as `dtype`."""
    _check_fp8(fp8, "dequantize_channel_fp8")
    n = fp8.shape[0]
    if scale.numel() != n:
        raise ValueError(
            f"dequantize_channel_fp8: scale has shape {list(scale.shape)} but a weight with {n} output "
            f"channels needs [{n}, 1]"
        )
    return (fp8.to(torch.float32) * scale.to(torch.float32).reshape(n, 1)).to(dtype)


def dequantize_tensor_fp8(
    fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """fp8 × one scale, as `dtype`."""
    _check_fp8(fp8, "dequantize_tensor_fp8")
    if scale.numel() != 1:
        raise ValueError(
            f"dequantize_tensor_fp8: expected one scale, got shape {list(scale.shape)} "
            "(a per-channel or block scale with a per-tensor quantization_config?)"
        )
    return (fp8.to(torch.float32) * scale.to(torch.float32).reshape(())).to(dtype)


# ---- which tensors ------------------------------------------------------------------------------


def should_quantize(name: str, tensor: torch.Tensor) -> bool:
    """True for the 2-D float weights of attention / MLP projections; False for everything that stays
    in high precision (embeddings, norms, lm_head, routers and MoE gates, biases, vision towers...).

    Only dtype and shape are read, so a meta tensor will do.
    """
    if not name.endswith(".weight") or tensor.dim() != 2 or tensor.dtype not in QUANTIZABLE_DTYPES:
        return False
    if tensor.numel() == 0:
        return False
    return not keeps_high_precision(name[: -len(".weight")])


def keeps_high_precision(module: str) -> bool:
    """Whether module `module` (a weight name without `.weight`) is on the keep-in-BF16 list."""
    if any(s in module for s in _KEEP_SUBSTRINGS):
        return True
    parts = module.split(".")
    if any(p in _KEEP_COMPONENTS for p in parts):
        return True
    return any(p.startswith(_KEEP_COMPONENT_PREFIXES) for p in parts)


# ---- config -------------------------------------------------------------------------------------


def quantization_config(
    strategy: str,
    block_size: tuple[int, int] | list[int] = DEFAULT_BLOCK_SIZE,
    modules_to_not_convert: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """The `quantization_config` entry of config.json for a checkpoint converted with `strategy`.

    block / tensor: SGLang's `fp8` method; channel: compressed-tensors float-quantized, as slime
    writes them (the skip list is `modules_to_not_convert` there and `ignore` here).
    """
    check_strategy(strategy)
    skipped = sorted(set(modules_to_not_convert))
    if strategy in ("block", "tensor"):
        cfg: dict[str, Any] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}
        if strategy == "block":
            cfg["weight_block_size"] = list(check_block_size(block_size))
        cfg["modules_to_not_convert"] = skipped
        return cfg
    args = {
        "actorder": None,
        "block_structure": None,
        "group_size": None,
        "num_bits": 8,
        "symmetric": True,
        "type": "float",
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    **args,
                    "dynamic": False,
                    "observer": "minmax",
                    "observer_kwargs": {},
                    "strategy": "channel",
                },
                "input_activations": {
                    **args,
                    "dynamic": True,
                    "observer": None,
                    "observer_kwargs": {},
                    "strategy": "token",
                },
                "output_activations": None,
            }
        },
        "ignore": skipped,
    }


def strategy_of(quant_config: Mapping[str, Any]) -> tuple[str, tuple[int, int] | None]:
    """(strategy, block size or None) that a `quantization_config` describes; ValueError if it is not FP8."""
    method = str(quant_config.get("quant_method", ""))
    if method == "fp8":
        block = quant_config.get("weight_block_size")
        return ("block", check_block_size(block)) if block else ("tensor", None)
    if method == "compressed-tensors":
        weights = [g.get("weights") or {} for g in (quant_config.get("config_groups") or {}).values()]
        kinds = {
            (w.get("type"), w.get("num_bits"), w.get("strategy"), tuple(w.get("block_structure") or ()))
            for w in weights
        }
        if len(kinds) != 1:
            raise ValueError(
                f"compressed-tensors config with {len(kinds)} different weight schemes is not supported; "
                "expected one float 8-bit group"
            )
        kind, bits, strategy, block = kinds.pop()
        if kind != "float" or bits != 8 or strategy not in STRATEGIES:
            raise ValueError(
                f"compressed-tensors weights type={kind!r} num_bits={bits!r} strategy={strategy!r} are not "
                "FP8 (expected type 'float', num_bits 8, strategy block / channel / tensor)"
            )
        return strategy, (check_block_size(block) if strategy == "block" else None)
    raise ValueError(
        f"quantization_config.quant_method={method!r} is not supported: expected 'fp8' or "
        "'compressed-tensors' (float-quantized)"
    )


def dequantize_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    quantization_config: Mapping[str, Any] | None,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, torch.Tensor]:
    """Plain weights from a loaded FP8 checkpoint: every float8 `<m>.weight` times its scale, as `dtype`.

    Reads the layout from `quantization_config` (config.json's `quantization_config`; None means the
    checkpoint is not quantized and comes back unchanged). Scale tensors and static activation
    scales (`input_scale`) are consumed; every other tensor passes through as is.
    """
    if not quantization_config:
        return dict(state_dict)
    strategy, block = strategy_of(quantization_config)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name, tensor in state_dict.items():
        if name.endswith((".weight_scale", ".weight_scale_inv", ".input_scale")):
            continue
        if tensor.dtype != FP8_DTYPE:
            if name.endswith(".weight") and tensor.dtype == torch.float8_e5m2:
                raise ValueError(f"{name} is float8_e5m2; only float8_e4m3fn checkpoints are supported")
            out[name] = tensor
            continue
        scale_key = next((name + s for s in ("_scale_inv", "_scale") if name + s in state_dict), None)
        if not name.endswith(".weight") or scale_key is None:
            raise ValueError(
                f"{name} is float8 but the checkpoint has no {name}_scale_inv or {name}_scale next to it; "
                "is the checkpoint complete (all shards loaded)?"
            )
        used.add(scale_key)
        scale = state_dict[scale_key]
        try:
            if strategy == "block":
                assert block is not None  # strategy_of gives a block size with the block strategy
                out[name] = dequantize_block_fp8(tensor, scale, block, dtype)
            elif strategy == "channel":
                out[name] = dequantize_channel_fp8(tensor, scale, dtype)
            else:
                out[name] = dequantize_tensor_fp8(tensor, scale, dtype)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from err
    orphans = sorted(
        k for k in state_dict if k.endswith((".weight_scale", ".weight_scale_inv")) and k not in used
    )
    if orphans:
        raise ValueError(
            f"{len(orphans)} scale tensors have no float8 weight beside them (first: {orphans[0]}); "
            "the checkpoint's weights and scales do not match"
        )
    return out


# ---- checks -------------------------------------------------------------------------------------


def check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown FP8 strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")


def check_block_size(block_size: Any) -> tuple[int, int]:
    """`block_size` as (rows, cols), two positive integers; anything else raises ValueError naming it."""
    try:
        bn, bk = (int(b) for b in block_size)
    except (TypeError, ValueError):
        raise ValueError(f"block size must be two integers [rows, cols], got {block_size!r}") from None
    if bn <= 0 or bk <= 0 or [bn, bk] != list(block_size):
        raise ValueError(f"block size must be two positive integers [rows, cols], got {block_size!r}")
    return bn, bk


def _check_weight(w: torch.Tensor, fn: str) -> None:
    if w.dim() != 2:
        raise ValueError(f"{fn}: expected a 2-D weight [out, in], got shape {list(w.shape)}")
    if w.dtype not in QUANTIZABLE_DTYPES:
        raise ValueError(f"{fn}: expected a bfloat16 / float16 / float32 weight, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"{fn}: the weight is empty (shape {list(w.shape)})")


def _check_fp8(t: torch.Tensor, fn: str) -> None:
    if t.dtype != FP8_DTYPE or t.dim() != 2:
        raise ValueError(f"{fn}: expected a 2-D float8_e4m3fn weight, got {t.dtype} of shape {list(t.shape)}")


def _check_finite(amax: torch.Tensor, fn: str) -> None:
    if not bool(torch.isfinite(amax).all()):
        raise ValueError(f"{fn}: the weight contains NaN or inf; it cannot be scaled into FP8")
