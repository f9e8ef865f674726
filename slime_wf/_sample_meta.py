"""What an SGLang `meta_info` carries beside tokens, in the shapes `Sample` keeps: top-p replay spans and
routed experts (int32 arrays, sent base64-encoded or as lists), and the speculative-decoding and
prefix-cache counters.

Plain Python lists throughout, so that a sample stays JSON as it is; a plugin may still hand in
torch tensors or numpy arrays (slime keeps tensors there), which are read through `tolist()`.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

TOP_P_TOKEN_ID_KEYS = ("top_p_token_ids", "top_p_kept_token_ids")
TOP_P_TOKEN_OFFSET_KEYS = ("top_p_token_offsets", "top_p_kept_token_offsets")


def plain(value: Any) -> Any:
    """Tensors and arrays as (nested) lists, recursively through dicts and lists; other values as they are."""
    if hasattr(value, "tolist") and hasattr(value, "shape"):
        return value.tolist()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def int_list(values: Any) -> list[int]:
    if values is None:
        return []
    flat = np.asarray(plain(values), dtype=np.int64).reshape(-1)
    return [int(v) for v in flat]


def float_list(values: Any) -> list[float] | None:
    if values is None:
        return None
    flat = np.asarray(plain(values), dtype=np.float64).reshape(-1)
    return [float(v) for v in flat]


def decode_int32_meta_array(meta_info: dict[str, Any], keys: str | Iterable[str]) -> list[int] | None:
    """The int32 array under the first of `keys` in `meta_info`, as a flat list; None when absent.

    SGLang sends these arrays base64-encoded (little-endian int32); lists and tensors are accepted too."""
    for key in (keys,) if isinstance(keys, str) else keys:
        if key in meta_info:
            value = meta_info[key]
            break
    else:
        return None
    if value is None:
        return None
    if isinstance(value, str):
        value = base64.b64decode(value.encode("ascii"))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return [int(v) for v in np.frombuffer(bytes(value), dtype="<i4")]
    return int_list(value)


def top_p_spans(meta_info: dict[str, Any], new_tokens: int) -> tuple[list[int], list[int]] | None:
    """(kept token ids, offsets) of `new_tokens` generated tokens, or None when the engine sent none.
    Token i kept ids[offsets[i]:offsets[i + 1]]."""
    ids = decode_int32_meta_array(meta_info, TOP_P_TOKEN_ID_KEYS)
    offsets = decode_int32_meta_array(meta_info, TOP_P_TOKEN_OFFSET_KEYS)
    if ids is None and offsets is None:
        return None
    if ids is None or offsets is None:
        raise ValueError("the engine's top-p replay must hold both token ids and offsets")
    if not offsets or offsets[0] != 0:
        raise ValueError(f"top-p token offsets must start with 0, got {offsets[:1]}")
    if offsets[-1] != len(ids):
        raise ValueError(f"top-p token offsets end at {offsets[-1]} but there are {len(ids)} token ids")
    if len(offsets) != new_tokens + 1:
        raise ValueError(
            f"top-p token offsets have {len(offsets)} entries for {new_tokens} generated tokens (want tokens + 1)"
        )
    return ids, offsets


def merge_top_p(
    base_ids: Any, base_offsets: Any, ids: list[int], offsets: list[int]
) -> tuple[list[int], list[int]]:
    base_ids, base_offsets = int_list(base_ids), int_list(base_offsets) or [0]
    shift = base_offsets[-1]
    return base_ids + ids, base_offsets + [o + shift for o in offsets[1:]]


def pad_top_p(ids: Any, offsets: Any, num_tokens: int) -> tuple[list[int], list[int]]:
    """Empty spans for `num_tokens` tokens the engine did not sample (tool output)."""
    ids, offsets = int_list(ids), int_list(offsets)
    if not offsets:
        raise ValueError("cannot add empty top-p spans to empty offsets")
    return ids, offsets + [offsets[-1]] * num_tokens


def routed_experts(
    existing: Any, meta_info: dict[str, Any], num_tokens: int, args: Any
) -> list[list[list[int]]] | None:
    """The sample's routed experts [tokens - 1, num_layers, moe_router_topk] after this answer, or None
    when the engine sent none; the answer's rows replace those from `routed_experts_start_len` on."""
    flat = decode_int32_meta_array(meta_info, "routed_experts")
    if flat is None:
        return None
    if args is None:
        raise ValueError("decoding routed experts needs args (num_layers, moe_router_topk)")
    start = int(meta_info.get("routed_experts_start_len", 0) or 0)
    if start < 0:
        raise ValueError(f"routed_experts_start_len must be non-negative, got {start}")
    rows, layers, topk = max(0, num_tokens - 1 - start), args.num_layers, args.moe_router_topk
    if len(flat) != rows * layers * topk:
        raise ValueError(
            f"routed_experts holds {len(flat)} values; {num_tokens} tokens from routed_experts_start_len={start} "
            f"with num_layers={layers} and moe_router_topk={topk} need {rows * layers * topk}"
        )
    new = np.asarray(flat, dtype=np.int64).reshape(rows, layers, topk).tolist()
    if start == 0:
        return new
    old = plain(existing)
    if old is None or len(old) < start:
        raise ValueError(
            f"routed_experts_start_len={start} but the sample holds {0 if old is None else len(old)} rows"
        )
    return list(old[:start]) + new


@dataclass
class SpecInfo:
    """Speculative-decoding counters summed over a sample's engine answers (slime's `Sample.SpecInfo`)."""

    spec_accept_token_num: int = 0
    spec_draft_token_num: int = 0
    spec_verify_ct: int = 0
    completion_token_num: int = 0

    @property
    def spec_accept_rate(self) -> float:
        return (
            self.spec_accept_token_num / self.spec_draft_token_num if self.spec_draft_token_num > 0 else 0.0
        )

    @property
    def spec_accept_length(self) -> float:
        return self.completion_token_num / self.spec_verify_ct if self.spec_verify_ct > 0 else 0.0

    def add(self, meta_info: dict[str, Any]) -> None:
        self.spec_accept_token_num += meta_info.get("spec_accept_token_num", 0)
        self.spec_draft_token_num += meta_info.get("spec_draft_token_num", 0)
        self.spec_verify_ct += meta_info.get("spec_verify_ct", 0)
        self.completion_token_num += meta_info.get("completion_tokens", 0)

    def to_dict(self) -> dict[str, int]:
        return dict(vars(self))

    @staticmethod
    def from_dict(data: dict[str, Any]) -> SpecInfo:
        return SpecInfo(**{k: data.get(k, 0) for k in SpecInfo.__dataclass_fields__})


@dataclass
class PrefixCacheInfo:
    """Prompt tokens and prefix-cache hits summed over a sample's engine answers (slime's)."""

    cached_tokens: int = 0
    total_prompt_tokens: int = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.cached_tokens / self.total_prompt_tokens if self.total_prompt_tokens > 0 else 0.0

    def add(self, meta_info: dict[str, Any]) -> None:
        self.cached_tokens += meta_info.get("cached_tokens", 0)
        self.total_prompt_tokens += meta_info.get("prompt_tokens", 0)

    def to_dict(self) -> dict[str, int]:
        return dict(vars(self))

    @staticmethod
    def from_dict(data: dict[str, Any]) -> PrefixCacheInfo:
        return PrefixCacheInfo(**{k: data.get(k, 0) for k in PrefixCacheInfo.__dataclass_fields__})
