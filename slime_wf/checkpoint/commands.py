"""`slime-wf download` and `slime-wf convert-fp8`: argument definitions and handlers.

Heavy imports (torch, s3fs, huggingface_hub) happen inside the handlers, so other subcommands
start fast.
"""

from __future__ import annotations

import argparse
import logging
import sys


def add_download_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="local folder, s3://bucket/prefix, or Hugging Face repo id (org/name)")
    p.add_argument(
        "--cache-dir",
        required=True,
        help="where downloads go: hub repos under <cache-dir>/hub, S3 under <cache-dir>/s3/<bucket>/<prefix>",
    )
    p.add_argument("--revision", default=None, help="hub branch, tag or commit to pin (hub only)")
    p.add_argument(
        "--allow-pattern",
        dest="allow_patterns",
        action="append",
        default=None,
        metavar="GLOB",
        help="only files matching this glob, e.g. '*.json' (repeatable)",
    )
    p.add_argument("--max-workers", type=int, default=8, help="parallel file downloads (default 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def download(ns: argparse.Namespace) -> int:
    """Prints the local folder on stdout."""
    from slime_wf.checkpoint.download import CheckpointError, resolve_checkpoint

    try:
        path = resolve_checkpoint(
            ns.source,
            ns.cache_dir,
            revision=ns.revision,
            allow_patterns=ns.allow_patterns,
            max_workers=ns.max_workers,
            progress=not ns.no_progress,
        )
    except CheckpointError as err:
        print(f"slime-wf download: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


def add_convert_fp8_arguments(p: argparse.ArgumentParser) -> None:
    # Flag names follow slime's tools/convert_hf_to_fp8.py.
    p.add_argument(
        "--model-dir", required=True, help="Hugging Face safetensors checkpoint (bf16 / fp16 / fp32)"
    )
    p.add_argument("--save-dir", required=True, help="where the FP8 checkpoint goes (new or empty folder)")
    p.add_argument(
        "--strategy",
        default="block",
        choices=["block", "channel", "tensor"],
        help="scale granularity: per block (SGLang's default FP8 format), per output channel, per tensor",
    )
    p.add_argument(
        "--block-size",
        type=int,
        nargs=2,
        default=[128, 128],
        metavar=("ROWS", "COLS"),
        help="block shape for --strategy block (default 128 128)",
    )
    p.add_argument(
        "--max-workers",
        type=int,
        default=None,
        help="tensors quantized in parallel (default: one per CPU core)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="allow a non-empty --save-dir (its old shards are removed)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def convert_fp8(ns: argparse.Namespace) -> int:
    from slime_wf.checkpoint.fp8_convert import ConversionError, convert_checkpoint

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        s = convert_checkpoint(
            ns.model_dir,
            ns.save_dir,
            ns.strategy,
            ns.block_size,
            ns.max_workers,
            overwrite=ns.overwrite,
            progress=not ns.no_progress,
        )
    except ConversionError as err:
        print(f"slime-wf convert-fp8: {err}", file=sys.stderr)
        return 2
    print(
        f"{s.save_dir}: {s.quantized} weights quantized ({s.strategy}), {s.kept} tensors kept, {s.shards} shards, "
        f"{s.bytes_in / 1e6:.1f} MB -> {s.bytes_out / 1e6:.1f} MB in {s.seconds:.1f}s"
    )
    return 0
