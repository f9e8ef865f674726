"""The local engine's model side: checkpoint loading (FP8 dequantized), in-place weight swaps,
and a batched KV cache that requests join and leave between decode steps.

Rows of the batch are right-aligned: every row's newest token sits in the last column, and a
row that started later has padding columns (masked out) on its left. A decode step therefore
appends exactly one column for all rows, and positions stay per row.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from transformers.cache_utils import Cache, DynamicLayer

from slime_wf.checkpoint import layout
from slime_wf.checkpoint.dtypes import FLOAT_DTYPES, torch_dtype

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


class WeightLoadError(ValueError):
    """A checkpoint cannot be loaded into the served model (missing files, names or shapes that differ)."""


def resolve_dtype(name: str) -> torch.dtype:
    """`auto` is float32: the CPU engine computes in full precision so its log-probs match the trainer's."""
    return torch_dtype(name, "--dtype", choices=FLOAT_DTYPES, auto=torch.float32)


def read_config(model_path: str | Path) -> dict:
    config = layout.hf_config(model_path)
    if config is None:
        raise WeightLoadError(
            f"{model_path} is not a Hugging Face checkpoint directory: it has no config.json"
        )
    return config


def read_state_dict(model_path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (safetensors shards, else pytorch_model*.bin).

    FP8 block-quantized checkpoints (`quantization_config` in config.json, `weight_scale_inv`
    tensors) come back dequantized, so the engine computes with the FP8-rounded weights.
    """
    path = Path(model_path)
    config = read_config(path)
    shards = sorted(path.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    if shards:
        from safetensors.torch import load_file

        for shard in shards:
            state.update(load_file(str(shard)))
    else:
        bins = sorted(path.glob("pytorch_model*.bin"))
        if not bins:
            raise WeightLoadError(f"no *.safetensors or pytorch_model*.bin weight files in {path}")
        for shard in bins:
            state.update(torch.load(shard, map_location="cpu", weights_only=True))
    quant = config.get("quantization_config")
    if quant:
        from slime_wf.checkpoint.fp8 import dequantize_state_dict

        try:
            state = dequantize_state_dict(state, quant, dtype=torch.float32)
        except ValueError as err:
            raise WeightLoadError(f"{path}: cannot dequantize the checkpoint: {err}") from err
    return state


def load_model(model_path: str | Path, dtype: torch.dtype) -> PreTrainedModel:
    """A causal LM from a checkpoint directory, in eval mode with SDPA attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = read_config(model_path)
    if not config.get("quantization_config"):
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation="sdpa")
    else:
        # transformers' FP8 path targets GPUs: build the model plain and load the dequantized weights.
        hf_config = AutoConfig.from_pretrained(model_path)
        if hasattr(hf_config, "quantization_config"):
            del hf_config.quantization_config
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
        copy_weights_(model, check_state_dict(model, read_state_dict(model_path)))
    return model.eval()


def check_state_dict(
    model: torch.nn.Module, state: dict[str, torch.Tensor], *, partial: bool = False
) -> dict[str, torch.Tensor]:
    """Match checkpoint tensors to the model's: every weight present (tied ones may be absent; with
    `partial`, any may be, as an update over a weight-update group names only what it sends), shapes equal.

    Returns the tensors to copy, cast to the model's dtype. Raises `WeightLoadError` before anything
    is changed, so a bad checkpoint never leaves the model half-updated.
    """
    own = model.state_dict()
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    ignore.append(re.compile(r"rotary_emb\.inv_freq$"))
    missing = [] if partial else sorted(k for k in own if k not in state and k not in tied)
    unexpected = sorted(k for k in state if k not in own and not any(p.search(k) for p in ignore))
    wrong_shape = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} weight(s) missing, e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unknown weight(s), e.g. {unexpected[:3]}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shape mismatch(es), e.g. {wrong_shape[:3]}")
    if problems:
        raise WeightLoadError(
            "the checkpoint does not fit the served architecture: "
            + "; ".join(problems)
            + ". A weight update must keep the model's architecture and sizes."
        )
    return {k: state[k].to(own[k].dtype) for k in own if k in state}


@torch.no_grad()
def copy_weights_(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy checked tensors into the model's own storage (tied weights follow their source)."""
    own = model.state_dict()
    for name, tensor in state.items():
        own[name].copy_(tensor)


class ThreadBudget:
    """How many of the engine's torch threads a forward pass gets: one per `min_gflop_per_thread` of its
    arithmetic (2 x the parameters its tokens go through), at least one, at most `max_threads`.

    The threads sleep between kernels (`OMP_WAIT_POLICY=PASSIVE`), and waking them costs more than a small
    kernel gains from them: on a 2-core host the 1.2M-parameter decode of 64 rows (0.15 GFLOP per step)
    took 0.14 s on one thread against 0.18 s on two, while the 12M one of 64 rows (1.6 GFLOP) took 2.9 s
    on two against 3.7 s on one. A pass on fewer threads also leaves cores to the processes beside the
    engine (the HTTP server, the rollout client, the trainer). `min_gflop_per_thread` 0: every pass gets
    `max_threads`."""

    def __init__(self, model: torch.nn.Module, max_threads: int, min_gflop_per_thread: float):
        if min_gflop_per_thread < 0:
            raise ValueError(f"min_gflop_per_thread must be 0 or more, not {min_gflop_per_thread}")
        # an embedding row is looked up, not multiplied, unless the output head shares the matrix
        embeddings, head = (_parameter_ids(model, f"get_{side}_embeddings") for side in ("input", "output"))
        params = sum(p.numel() for p in model.parameters() if id(p) not in embeddings - head)
        self.flop_per_token = 2 * params
        self.max_threads = max(1, max_threads)
        self.min_flop_per_thread = round(min_gflop_per_thread * 1e9)  # whole FLOPs: no rounding at the steps

    def threads(self, tokens: int) -> int:
        if self.min_flop_per_thread <= 0:
            return self.max_threads
        return max(1, min(self.max_threads, tokens * self.flop_per_token // self.min_flop_per_thread))


def _parameter_ids(model: torch.nn.Module, getter: str) -> set[int]:
    """The ids of the parameters of the module `model.<getter>()` returns (none if it has no such method)."""
    get = getattr(model, getter, None)
    module = get() if callable(get) else None
    return {id(p) for p in module.parameters()} if isinstance(module, torch.nn.Module) else set()


class _RowLayer(DynamicLayer):
    """A KV layer over a preallocated `[batch, heads, capacity, dim]` buffer.

    Valid columns are `[start, end)`. Appending writes in place; the buffer only reallocates when
    full, so a decode step does not copy the whole cache as `torch.cat` would.
    """

    def __init__(self) -> None:
        super().__init__()
        self.start = self.end = 0
        self.k_buf: torch.Tensor | None = None  # None until the first set_buffers
        self.v_buf: torch.Tensor | None = None

    def set_buffers(self, k_buf: torch.Tensor, v_buf: torch.Tensor, start: int, end: int) -> None:
        self.k_buf, self.v_buf, self.start, self.end = k_buf, v_buf, start, end
        self.is_initialized = True
        self._refresh()

    def _refresh(self) -> None:
        assert self.k_buf is not None and self.v_buf is not None  # set_buffers runs before any refresh
        self.keys = self.k_buf[:, :, self.start : self.end]
        self.values = self.v_buf[:, :, self.start : self.end]

    def kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of the valid columns `[start, end)`."""
        assert self.keys is not None and self.values is not None, "a KV layer read before it holds any buffer"
        return self.keys, self.values

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device = key_states.device
        b, h, n, d = key_states.shape
        cap = n + 64
        self.set_buffers(key_states.new_zeros(b, h, cap, d), value_states.new_zeros(b, h, cap, d), 0, 0)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.k_buf is not None and self.v_buf is not None  # lazy_initialization allocates them
        n = key_states.shape[-2]
        if self.end + n > self.k_buf.shape[2]:
            width = self.end - self.start
            cap = max(2 * (width + n), 64)
            b, h, _, d = self.k_buf.shape
            k_new, v_new = self.k_buf.new_zeros(b, h, cap, d), self.v_buf.new_zeros(b, h, cap, d)
            keys, values = self.kv()
            k_new[:, :, :width] = keys
            v_new[:, :, :width] = values
            self.k_buf, self.v_buf, self.start, self.end = k_new, v_new, 0, width
        self.k_buf[:, :, self.end : self.end + n] = key_states
        self.v_buf[:, :, self.end : self.end + n] = value_states
        self.end += n
        self._refresh()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.end - self.start if self.is_initialized else 0


def new_cache(num_layers: int) -> Cache:
    return Cache(layers=[_RowLayer() for _ in range(num_layers)])


def _row_layers(cache: Cache) -> list[_RowLayer]:
    """The layers of a cache from `new_cache` (every cache here is one), typed as what they are."""
    return cast(list[_RowLayer], cache.layers)


class BatchKV:
    """The running batch's KV cache, padding mask and per-row positions."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self._clear()

    def _clear(self) -> None:
        self.cache = new_cache(self.num_layers)
        self.valid = torch.zeros(0, 0, dtype=torch.bool)  # [rows, width]: False on left padding
        self.positions = torch.zeros(0, dtype=torch.long)  # next position of each row

    @property
    def rows(self) -> int:
        return self.valid.shape[0]

    @property
    def width(self) -> int:
        return self.valid.shape[1]

    def add(self, rows: list[tuple[Cache, int]]) -> None:
        """Append rows of prefilled caches (from `new_cache`) as new rows, right-aligned with the existing
        ones: `(cache, row)` is row `row` of `cache`, and a row may be taken more than once (the requests
        that share a prompt share its prefill). Consecutive rows of one cache are copied with one gather
        per layer, not one copy per row."""
        if not rows:
            return
        runs: list[tuple[Cache, list[int]]] = []  # consecutive rows of one cache
        for cache, row in rows:
            if runs and runs[-1][0] is cache:
                runs[-1][1].append(row)
            else:
                runs.append((cache, [row]))
        # per run, once for every layer: its rows' index and its length (one cache, one length)
        indexes = [torch.tensor(picked) for _, picked in runs]
        run_lengths = [_row_layers(cache)[0].get_seq_length() for cache, _ in runs]
        lengths = torch.tensor([n for n, (_, picked) in zip(run_lengths, runs, strict=True) for _ in picked])
        old_rows, old_width = self.rows, self.width
        width = max(old_width, int(lengths.max()))
        new_rows = old_rows + len(rows)
        cap = width + 64
        valid = torch.zeros(new_rows, width, dtype=torch.bool)
        valid[:old_rows, width - old_width :] = self.valid
        valid[old_rows:] = torch.arange(width) >= (width - lengths)[:, None]
        own_layers = _row_layers(self.cache)
        for li in range(self.num_layers):
            sample_keys, sample_values = _row_layers(rows[0][0])[li].kv()
            _, heads, _, dim = sample_keys.shape
            k_buf = sample_keys.new_zeros(new_rows, heads, cap, dim)
            v_buf = sample_values.new_zeros(new_rows, heads, cap, dim)
            if old_rows:
                old_keys, old_values = own_layers[li].kv()
                k_buf[:old_rows, :, width - old_width : width] = old_keys
                v_buf[:old_rows, :, width - old_width : width] = old_values
            at = old_rows
            for (cache, picked), index, n in zip(runs, indexes, run_lengths, strict=True):
                keys, values = _row_layers(cache)[li].kv()
                k_buf[at : at + len(picked), :, width - n : width] = keys.index_select(0, index)
                v_buf[at : at + len(picked), :, width - n : width] = values.index_select(0, index)
                at += len(picked)
            layer = own_layers[li] if old_rows else _RowLayer()
            layer.set_buffers(k_buf, v_buf, 0, width)
            self.cache.layers[li] = layer
        self.valid = valid
        self.positions = torch.cat([self.positions, lengths])

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order) and drop columns that became padding for every row."""
        if len(rows) == self.rows:
            return
        if not rows:
            self._clear()
            return
        index = torch.tensor(rows, dtype=torch.long)
        valid = self.valid.index_select(0, index)
        first = int(valid.any(dim=0).float().argmax())
        self.valid = valid[:, first:]
        self.positions = self.positions.index_select(0, index)
        for layer in _row_layers(self.cache):
            assert layer.k_buf is not None and layer.v_buf is not None  # a batch with rows has buffers
            # One gather keeps the buffer's spare capacity; trimmed columns just move the start.
            layer.set_buffers(
                layer.k_buf.index_select(0, index),
                layer.v_buf.index_select(0, index),
                layer.start + first,
                layer.end,
            )

    def snapshot(self) -> tuple:
        """The state before a decode step, for `restore` after a failed one. Cheap: a step only writes
        past each layer's end (or into a new buffer when full), so references suffice."""
        layers = [(layer.k_buf, layer.v_buf, layer.start, layer.end) for layer in _row_layers(self.cache)]
        return self.valid, self.positions.clone(), layers

    def restore(self, snapshot: tuple) -> None:
        self.valid, positions, layers = snapshot
        self.positions = positions.clone()
        for layer, (k_buf, v_buf, start, end) in zip(_row_layers(self.cache), layers, strict=True):
            if k_buf is not None:
                layer.set_buffers(k_buf, v_buf, start, end)

    def row_cache(self, row: int) -> tuple[Cache, int]:
        """A copy of one row without its left padding, as a single-row cache, and its length."""
        n = int(self.valid[row].sum())
        cache = new_cache(self.num_layers)
        for layer, own in zip(_row_layers(cache), _row_layers(self.cache), strict=True):
            own_keys, own_values = own.kv()
            keys, values = own_keys[row : row + 1, :, -n:], own_values[row : row + 1, :, -n:]
            _, heads, _, dim = keys.shape
            k_buf, v_buf = keys.new_zeros(1, heads, n + 64, dim), values.new_zeros(1, heads, n + 64, dim)
            k_buf[:, :, :n], v_buf[:, :, :n] = keys, values
            layer.set_buffers(k_buf, v_buf, 0, n)
        return cache, n

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The 2D attention mask and position ids of a one-token decode step; call `advance` after it."""
        mask = torch.cat([self.valid, torch.ones(self.rows, 1, dtype=torch.bool)], dim=1)
        return mask.long(), self.positions[:, None].clone()

    def advance(self) -> None:
        self.valid = torch.cat([self.valid, torch.ones(self.rows, 1, dtype=torch.bool)], dim=1)
        self.positions += 1
