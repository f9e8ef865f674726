"""The FP8 layout a weight sync must produce: the one the engines were started with.

An engine built from an FP8 checkpoint holds each quantized layer as float8 weights plus scales and
copies what a weight update sends without quantizing it (SGLang's FP8 loader), so every sync must
arrive in exactly the checkpoint's layout. `Fp8Format.of_checkpoint` reads that layout from the
checkpoint itself, as slime does when `--hf-checkpoint` is a published FP8 checkpoint:

- the scale granularity and block size, from config.json's `quantization_config`;
- which weights are float8, and the name, shape and dtype of each one's scale, from the safetensors
  headers (`weight_scale_inv` for DeepSeek-style blocks, `weight_scale` for compressed-tensors...);
- the modules kept in high precision (`modules_to_not_convert`, `ignored_layers` or `ignore`),
  checked against the tensors;
- the `quantization_config` itself, written unchanged into every export.

`Fp8Format.from_settings` is the layout of slime-wf's own FP8 copy (`rollout_fp8`): every weight
`fp8.should_quantize` picks, with `fp8.scale_name` scales.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from slime_wf.checkpoint import CheckpointError
from slime_wf.checkpoint.fp8 import (
    DEFAULT_BLOCK_SIZE,
    check_block_size,
    check_strategy,
    scale_name,
    should_quantize,
    strategy_of,
)
from slime_wf.checkpoint.layout import hf_quantization_config

_SCALE_SUFFIXES = ("_scale_inv", "_scale")


class ScaleSpec(NamedTuple):
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors spelling: "F32", "BF16"


@dataclass(frozen=True)
class Fp8Format:
    strategy: str  # block / channel / tensor
    block_size: tuple[int, int] | None
    # config.json's quantization_config as the checkpoint has it; None: the converter writes its own.
    quantization_config: dict[str, Any] | None = field(default=None, compare=False)
    # float8 weight name -> its scale, as the checkpoint stores them; None: fp8.should_quantize decides.
    scales: dict[str, ScaleSpec] | None = field(default=None, compare=False)
    not_converted: tuple[str, ...] = ()
    source: str | None = None

    @classmethod
    def from_settings(cls, strategy: str = "block", block_size=DEFAULT_BLOCK_SIZE) -> Fp8Format:
        check_strategy(strategy)
        return cls(strategy, check_block_size(block_size) if strategy == "block" else None)

    @classmethod
    def of_checkpoint(cls, path: str | os.PathLike) -> Fp8Format | None:
        """The layout of the FP8 HF checkpoint at `path`; None when it is not quantized.

        Raises CheckpointError for a quantized checkpoint that a weight sync cannot reproduce (not
        FP8 e4m3, static activation scales, float8 weights without scales, or a module both float8
        and listed as not converted)."""
        qcfg = hf_quantization_config(path)
        if not qcfg:
            return None
        where = f"{os.path.join(str(path), 'config.json')}: quantization_config"
        try:
            strategy, block = strategy_of(qcfg)
        except ValueError as err:
            raise CheckpointError(
                f"{where}: {err}. Rollout serves FP8 checkpoints (or plain ones); pass the BF16 checkpoint as "
                "hf_checkpoint, with rollout_fp8: true for an FP8 copy"
            ) from None
        _check_dynamic_e4m3(qcfg, where)
        not_converted = _not_converted(qcfg)
        scales = _read_scales(Path(path))
        listed = sorted(w for w in scales if _matches(w[: -len(".weight")], not_converted))
        if listed:
            raise CheckpointError(
                f"{path}: {listed[0]} is float8 but its module is listed in modules_to_not_convert / ignore "
                f"({len(listed)} such weights); the checkpoint's config and tensors disagree, so engines cannot load it"
            )
        return cls(strategy, block, dict(qcfg), scales, tuple(not_converted), os.path.abspath(str(path)))

    # ---- per weight ------------------------------------------------------------------------

    def quantizes(self, name: str, tensor: torch.Tensor) -> bool:
        """Whether weight `name` (`tensor`: its dtype and shape; a meta tensor will do) is sent as FP8."""
        if self.scales is None:
            return should_quantize(name, tensor)
        return name in self.scales

    def _block(self) -> tuple[int, int]:
        """The block size, which the block strategy always has."""
        assert self.block_size is not None, f"FP8 strategy {self.strategy!r} has no block size"
        return self.block_size

    def scale_for(self, name: str, shape: tuple[int, ...] | list[int]) -> ScaleSpec:
        """Name, shape and dtype of the scale of the [N, K] weight `name`."""
        n, k = shape
        own = {
            "block": lambda: (math.ceil(n / self._block()[0]), math.ceil(k / self._block()[1])),
            "channel": lambda: (n, 1),
            "tensor": lambda: (1,),
        }[self.strategy]()
        if self.scales is None:
            return ScaleSpec(scale_name(name, self.strategy), own, "F32")
        spec = self.scales[name]
        if math.prod(spec.shape) != math.prod(own):
            raise ValueError(
                f"{self.source} stores {spec.name} with shape {list(spec.shape)}, but a {list(shape)} weight with "
                f"{self.describe()} scales needs {list(own)}: the trained model and the rollout checkpoint differ"
            )
        return spec

    def describe(self) -> str:
        kind = f"block {self._block()[0]}x{self._block()[1]}" if self.strategy == "block" else self.strategy
        if self.scales is None:
            return f"FP8 {kind}"
        suffixes = sorted({s.name.rsplit(".", 1)[-1] for s in self.scales.values()})
        return f"FP8 {kind} ({len(self.scales)} weights, scales {'/'.join(suffixes)}, as in {self.source})"

    # ---- checking an export ------------------------------------------------------------------

    def check_export(self, folder: str | os.PathLike) -> int:
        """Raise CheckpointError unless the HF checkpoint in `folder` is in this layout; returns the
        number of float8 weights. Reads config.json and the safetensors headers only."""
        qcfg = hf_quantization_config(folder)
        if not qcfg:
            raise CheckpointError(
                f"{folder}: config.json has no quantization_config; expected {self.describe()}"
            )
        if self.quantization_config is not None and qcfg != self.quantization_config:
            raise CheckpointError(
                f"{folder}: quantization_config {json.dumps(qcfg, sort_keys=True)} differs from the rollout "
                f"checkpoint's {json.dumps(self.quantization_config, sort_keys=True)}"
            )
        got = _read_scales(Path(folder))
        if self.scales is not None and got != self.scales:
            missing = sorted(set(self.scales) - set(got))
            extra = sorted(set(got) - set(self.scales))
            differ = sorted(w for w in set(got) & set(self.scales) if got[w] != self.scales[w])
            raise CheckpointError(
                f"{folder} is not in the layout of {self.source}: not FP8 {missing[:3]}, FP8 but not in the "
                f"checkpoint {extra[:3]}, other scales {[(w, got[w], self.scales[w]) for w in differ[:2]]}"
            )
        if not got:
            raise CheckpointError(f"{folder}: no float8 weights; expected {self.describe()}")
        return len(got)


def _check_dynamic_e4m3(qcfg: dict[str, Any], where: str) -> None:
    if qcfg.get("quant_method") == "fp8":
        if qcfg.get("fmt", "e4m3") != "e4m3":
            raise CheckpointError(f"{where}: fmt={qcfg['fmt']!r}; only e4m3 FP8 is supported")
        if qcfg.get("activation_scheme", "dynamic") != "dynamic":
            raise CheckpointError(
                f"{where}: activation_scheme={qcfg['activation_scheme']!r}; a weight sync cannot recompute static "
                "activation scales (input_scale), so only dynamic activation scaling is supported"
            )
        return
    for group, cfg in (qcfg.get("config_groups") or {}).items():
        acts = (cfg or {}).get("input_activations") or {}
        if acts and not acts.get("dynamic", False):
            raise CheckpointError(
                f"{where}: config_groups.{group}.input_activations is static; a weight sync cannot recompute static "
                "activation scales, so only dynamic activation scaling is supported"
            )


def _not_converted(qcfg: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key in ("modules_to_not_convert", "ignored_layers", "ignore"):
        out += [str(m) for m in qcfg.get(key) or []]
    return out


def _matches(module: str, patterns: list[str]) -> bool:
    """SGLang's prefix matching of skipped modules, with or without the `model.` prefix; `re:` entries are regexes."""
    bare = module.removeprefix("model.")
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], module):
                return True
            continue
        p = p.removeprefix("model.")
        if bare == p or bare.startswith(p + "."):
            return True
    return False


def _read_scales(folder: Path) -> dict[str, ScaleSpec]:
    """float8 weight name -> its scale, from the safetensors headers of `folder`."""
    from slime_wf.checkpoint.safetensors_stream import list_shards, read_header

    try:
        shards = list_shards(str(folder))
        entries = {e.name: e for s in shards for e in read_header(os.path.join(folder, s))[0]}
    except (ValueError, OSError) as err:
        raise CheckpointError(f"cannot read the tensors of {folder}: {err}") from None
    scales: dict[str, ScaleSpec] = {}
    for name, e in entries.items():
        if e.dtype == "F8_E5M2":
            raise CheckpointError(
                f"{folder}: {name} is float8_e5m2; only float8_e4m3fn checkpoints are supported"
            )
        if e.dtype != "F8_E4M3":
            continue
        scale = next((entries[name + s] for s in _SCALE_SUFFIXES if name + s in entries), None)
        if not name.endswith(".weight") or scale is None:
            raise CheckpointError(
                f"{folder}: {name} is float8 but has no {name}_scale_inv or {name}_scale beside it"
            )
        scales[name] = ScaleSpec(scale.name, tuple(scale.shape), scale.dtype)
    return scales
