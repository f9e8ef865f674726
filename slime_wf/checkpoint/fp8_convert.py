"""Convert a Hugging Face safetensors checkpoint to FP8 (`slime-wf convert-fp8`).

Each output shard is laid out from its input shard's header before any data is read. A pool of
worker threads then takes the tensors one by one (in shard order): 2-D projection weights are
quantized (`fp8.should_quantize`), everything else is copied byte for byte, and each result is
written straight to its place in the output file. Memory holds about `max_workers` tensors at a
time, whatever the shard size; a shard appears under its final name only when it is complete, and
`config.json` (which carries `quantization_config`) is written last.

The output follows slime's `tools/convert_hf_to_fp8.py`: same shard names, same tensor names plus
one scale per quantized weight, a `model.safetensors.index.json`, every non-weight file copied.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from slime_wf.checkpoint import CheckpointError
from slime_wf.checkpoint.fp8 import (
    DEFAULT_BLOCK_SIZE,
    QUANTIZABLE_DTYPES,
    check_block_size,
    check_strategy,
    quantization_config,
    quantize_fp8,
)
from slime_wf.checkpoint.fp8_format import Fp8Format, ScaleSpec
from slime_wf.checkpoint.layout import CONFIG, hf_config
from slime_wf.checkpoint.safetensors_stream import (
    INDEX_NAME,
    TORCH_DTYPES,
    StreamingWriter,
    TensorEntry,
    _itemsize,
    list_shards,
    read_header,
    read_tensor,
)

log = logging.getLogger(__name__)

# Weights in other formats are not converted and would only confuse loaders if copied beside FP8 ones.
_OTHER_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


class ConversionError(ValueError):
    """Bad input to the FP8 converter; the message names the input and what to do."""


@dataclass
class ConversionSummary:
    save_dir: str
    strategy: str
    shards: int
    quantized: int  # weights quantized to FP8
    kept: int  # tensors copied unchanged
    bytes_in: int  # tensor bytes read
    bytes_out: int  # tensor bytes written
    seconds: float
    quantization_config: dict[str, Any] = field(repr=False)


@dataclass
class _Shard:
    """One input shard and its output, opened when its first tensor is taken."""

    src: str
    dst: str
    entries: list[TensorEntry]
    quantize: dict[str, ScaleSpec]  # weight -> its scale
    layout: list[tuple[str, str, tuple[int, ...], int]]
    remaining: int = 0
    src_fd: int = -1
    writer: StreamingWriter | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def open(self) -> StreamingWriter:
        with self.lock:
            if self.writer is None:
                self.src_fd = os.open(self.src, os.O_RDONLY)
                self.writer = StreamingWriter(self.dst, self.layout, {"format": "pt"})
            return self.writer

    def done_one(self) -> None:
        with self.lock:
            self.remaining -= 1
            if self.remaining == 0:
                assert self.writer is not None  # a shard counts down only after open()
                self.writer.close()
                os.close(self.src_fd)
                self.src_fd = -1

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
        if self.src_fd >= 0:
            os.close(self.src_fd)
            self.src_fd = -1


def convert_checkpoint(
    model_dir: str,
    save_dir: str,
    strategy: str = "block",
    block_size: tuple[int, int] | list[int] | None = DEFAULT_BLOCK_SIZE,
    max_workers: int | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    fmt: Fp8Format | None = None,
) -> ConversionSummary:
    """Write an FP8 copy of the Hugging Face checkpoint in `model_dir` to `save_dir`.

    `strategy` is "block" (scales per `block_size` tile), "channel" or "tensor"; `max_workers`
    threads (default: one per CPU core) quantize tensors concurrently. `save_dir` must be new or
    empty unless `overwrite`. Raises ConversionError for bad input.

    `fmt` (instead of `strategy` and `block_size`): write exactly that layout, e.g. an FP8
    checkpoint's own (`Fp8Format.of_checkpoint`): its float8 weights, scale names, shapes and
    dtypes, and its quantization_config unchanged.
    """
    started = time.perf_counter()
    if fmt is not None:
        strategy, block_size = fmt.strategy, fmt.block_size
    try:
        check_strategy(strategy)
        block = check_block_size(block_size or DEFAULT_BLOCK_SIZE) if strategy == "block" else None
    except ValueError as err:
        raise ConversionError(str(err)) from None
    workers = max_workers if max_workers is not None else (os.cpu_count() or 1)
    if workers < 1:
        raise ConversionError(f"max_workers must be at least 1, got {max_workers}")
    config = _read_config(model_dir)
    shard_names = _input_shards(model_dir)
    _prepare_save_dir(model_dir, save_dir, overwrite)

    fmt = fmt or Fp8Format.from_settings(strategy, block or DEFAULT_BLOCK_SIZE)
    shards = [_plan_shard(os.path.join(model_dir, n), os.path.join(save_dir, n), fmt) for n in shard_names]
    _check_unique_names(shards)
    _check_covers_format(shards, fmt, model_dir)
    _warn_unaligned_blocks(shards, block)
    _copy_other_files(model_dir, save_dir)
    bytes_in = sum(e.nbytes for s in shards for e in s.entries)
    _run(shards, strategy, block, workers, bytes_in, progress)

    weight_map = {name: os.path.basename(s.dst) for s in shards for name, *_ in s.layout}
    bytes_out = sum(nbytes for s in shards for *_, nbytes in s.layout)
    kept_modules = [
        e.name[: -len(".weight")]
        for s in shards
        for e in s.entries
        if e.name.endswith(".weight") and e.name not in s.quantize
    ]
    quant_cfg = fmt.quantization_config or quantization_config(
        strategy, block or DEFAULT_BLOCK_SIZE, kept_modules
    )
    index = {"metadata": {"total_size": bytes_out}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(os.path.join(save_dir, INDEX_NAME), index)
    _write_json(os.path.join(save_dir, "config.json"), {**config, "quantization_config": quant_cfg})
    quantized = sum(len(s.quantize) for s in shards)
    return ConversionSummary(
        save_dir=save_dir,
        strategy=strategy,
        shards=len(shards),
        quantized=quantized,
        kept=sum(len(s.entries) for s in shards) - quantized,
        bytes_in=bytes_in,
        bytes_out=bytes_out,
        seconds=time.perf_counter() - started,
        quantization_config=quant_cfg,
    )


def _run(shards: list[_Shard], strategy: str, block, workers: int, total: int, progress: bool) -> None:
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="convert-fp8", disable=not progress)
    bar_lock = threading.Lock()

    def one(shard: _Shard, entry: TensorEntry) -> None:
        try:
            writer = shard.open()
            if entry.name in shard.quantize:
                w = read_tensor(shard.src_fd, entry)
                q, scale = quantize_fp8(w, strategy, block or DEFAULT_BLOCK_SIZE)
                del w
                spec = shard.quantize[entry.name]
                writer.write(entry.name, q)
                writer.write(spec.name, scale.to(TORCH_DTYPES[spec.dtype]))
            else:
                writer.copy_from(entry.name, shard.src_fd, entry.begin)
            with bar_lock:
                bar.update(entry.nbytes)
            shard.done_one()
        except OSError as err:
            raise _describe_os_error(err, shard) from err
        except ValueError as err:
            raise ConversionError(f"{shard.src}: tensor {entry.name!r}: {err}") from err

    # Workers are the only parallelism, one intra-op thread each: whole tensors in parallel need no
    # synchronization, while torch's own threads would split every ~1M-element chunk and meet at each
    # op (and oversubscribe the cores on top of the workers). The setting is process-wide: restored
    # afterwards.
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="convert-fp8")
    try:
        for s in shards:
            if not s.entries:  # an empty input shard still gets its (empty) output
                s.open()
                s.remaining = 1
                s.done_one()
        futures = [pool.submit(one, s, e) for s in shards for e in s.entries]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((err for f in done if (err := f.exception()) is not None), None)
        if failed is not None:
            raise failed
        pool.shutdown(wait=True)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        for s in shards:
            s.abort()
        raise
    finally:
        torch.set_num_threads(saved_threads)
        bar.close()


def _plan_shard(src: str, dst: str, fmt: Fp8Format) -> _Shard:
    try:
        entries, _ = read_header(src)
    except ValueError as err:
        raise ConversionError(str(err)) from None
    names = {e.name for e in entries}
    quantize: dict[str, ScaleSpec] = {}
    layout: list[tuple[str, str, tuple[int, ...], int]] = []
    for e in entries:
        dtype = TORCH_DTYPES.get(e.dtype)
        if dtype is not None and fmt.quantizes(e.name, torch.empty(e.shape, dtype=dtype, device="meta")):
            if dtype not in QUANTIZABLE_DTYPES or len(e.shape) != 2:
                raise ConversionError(
                    f"{src}: {e.name} is {e.dtype} {list(e.shape)}, but {fmt.source} stores it as an FP8 matrix"
                )
            try:
                scale = fmt.scale_for(e.name, e.shape)
            except ValueError as err:
                raise ConversionError(f"{src}: {err}") from None
            if scale.name in names:
                raise ConversionError(
                    f"{src} already holds {scale.name}: the checkpoint looks quantized already"
                )
            n, k = e.shape
            layout.append((e.name, "F8_E4M3", e.shape, n * k))
            layout.append(
                (scale.name, scale.dtype, scale.shape, _itemsize(scale.dtype) * _numel(scale.shape))
            )
            quantize[e.name] = scale
        else:
            layout.append((e.name, e.dtype, e.shape, e.nbytes))
    return _Shard(src=src, dst=dst, entries=entries, quantize=quantize, layout=layout, remaining=len(entries))


# ---- input checks -------------------------------------------------------------------------------


def _read_config(model_dir: str) -> dict[str, Any]:
    if not os.path.isdir(model_dir):
        raise ConversionError(f"model dir {model_dir} does not exist or is not a directory")
    path = os.path.join(model_dir, CONFIG)
    try:
        config = hf_config(model_dir)
    except CheckpointError as err:  # not valid JSON
        raise ConversionError(str(err)) from None
    if config is None:
        raise ConversionError(
            f"{model_dir} has no config.json: convert-fp8 needs a Hugging Face checkpoint folder "
            "(config.json plus *.safetensors)"
        )
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method")
        raise ConversionError(
            f"{path} already has a quantization_config (quant_method={method!r}): convert the BF16 checkpoint instead"
        )
    return config


def _input_shards(model_dir: str) -> list[str]:
    try:
        return list_shards(model_dir)
    except ValueError as err:
        raise ConversionError(str(err)) from None


def _prepare_save_dir(model_dir: str, save_dir: str, overwrite: bool) -> None:
    if os.path.realpath(save_dir) == os.path.realpath(model_dir):
        raise ConversionError(f"save dir {save_dir} is the model dir: choose a different --save-dir")
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise ConversionError(f"save dir {save_dir} exists and is not a directory")
    os.makedirs(save_dir, exist_ok=True)
    existing = [n for n in os.listdir(save_dir) if not n.startswith(".")]
    if existing and not overwrite:
        raise ConversionError(
            f"save dir {save_dir} is not empty ({len(existing)} entries, e.g. {existing[0]}); "
            "choose an empty one or pass overwrite (--overwrite)"
        )
    for name in existing:
        if name.endswith((".safetensors", ".safetensors.tmp")) or name == INDEX_NAME:
            os.unlink(os.path.join(save_dir, name))  # stale shards would be picked up by loaders


def _check_covers_format(shards: list[_Shard], fmt: Fp8Format, model_dir: str) -> None:
    """Every weight the format stores as FP8 is in the input: else the engines would keep stale ones."""
    if fmt.scales is None:
        return
    missing = sorted(set(fmt.scales) - {name for s in shards for name in s.quantize})
    if missing:
        raise ConversionError(
            f"{model_dir} has no {missing[0]} ({len(missing)} weights missing), which {fmt.source} stores in FP8: "
            "the trained model and the rollout checkpoint are different architectures"
        )


def _check_unique_names(shards: list[_Shard]) -> None:
    seen: dict[str, str] = {}
    for s in shards:
        for e in s.entries:
            if e.name in seen:
                raise ConversionError(f"tensor {e.name!r} is in both {seen[e.name]} and {s.src}")
            seen[e.name] = s.src


_WARNED_UNALIGNED: set[tuple] = set()


def _warn_unaligned_blocks(shards: list[_Shard], block: tuple[int, int] | None) -> None:
    """Once per process and set of shapes: a campaign converts the same model at every weight sync."""
    if block is None:
        return
    odd = [
        (e.name, e.shape)
        for s in shards
        for e in s.entries
        if e.name in s.quantize and (e.shape[0] % block[0] or e.shape[1] % block[1])
    ]
    seen = (block, tuple((name, tuple(shape)) for name, shape in odd))
    if odd and seen not in _WARNED_UNALIGNED:
        _WARNED_UNALIGNED.add(seen)
        log.warning(
            "%d quantized weights are not multiples of the %dx%d block (e.g. %s %s). They are padded correctly, but "
            "SGLang refuses block FP8 for fused (qkv / gate_up) or tensor-parallel layers whose sizes are not "
            "multiples of the block.",
            len(odd),
            block[0],
            block[1],
            odd[0][0],
            list(odd[0][1]),
        )


def _copy_other_files(model_dir: str, save_dir: str) -> None:
    for name in sorted(os.listdir(model_dir)):
        src = os.path.join(model_dir, name)
        if name.startswith(".") or name in ("config.json", INDEX_NAME) or name.endswith(".safetensors"):
            continue
        if os.path.isdir(src) or name.endswith(_OTHER_WEIGHT_SUFFIXES):
            log.info("not copying %s (a folder or a non-safetensors weight file)", src)
            continue
        shutil.copy2(src, os.path.join(save_dir, name))


# ---- helpers ------------------------------------------------------------------------------------


def _describe_os_error(err: OSError, shard: _Shard) -> Exception:
    if err.errno == errno.ENOSPC:
        folder = os.path.dirname(os.path.abspath(shard.dst))
        need = sum(nbytes for *_, nbytes in shard.layout)
        return ConversionError(
            f"no space left in {folder} while writing {os.path.basename(shard.dst)} (~{need} bytes for this shard); "
            "free space or choose another --save-dir"
        )
    return ConversionError(f"{shard.src} -> {shard.dst}: {err}")


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
