"""`slime-wf hf-parity`: check the Megatron model against transformers on an HF checkpoint.

Loads the checkpoint into transformers and into the Megatron model (at tensor-parallel size
`--tp`), compares logits on a fixed batch that includes a right-padded sequence, exports the
Megatron weights back to HF names and compares them with the checkpoint bit for bit. The last
line printed is a JSON object (`max_abs_logit_diff`, `roundtrip_exact`, ...).

`--tp N > 1` re-launches itself under `torchrun --standalone --nproc-per-node N`; rank 0
reports. Running it under torchrun yourself works too.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

logger = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")


def parity_batch(vocab_size: int, *, seq_len: int = 16, seed: int = 0):
    """Three sequences of random tokens: two full, one right-padded to `seq_len` (mask 0)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (3, seq_len), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    real = seq_len * 5 // 8
    attention_mask[2, real:] = 0
    input_ids[2, real:] = 0
    return input_ids, attention_mask


def _hf_logits(hf_dir: str, input_ids, attention_mask, dtype, device):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, attn_implementation="eager")
    model.to(device).eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
    return logits.float().cpu()


def run_hf_parity(
    hf_dir: str, *, tp: int = 1, dtype: str = "float32", export_dir: str | None = None
) -> dict | None:
    """Run the parity check in this process (every rank of a torchrun world calls it).

    Returns the report on global rank 0 and None on the others. Initializes and destroys the
    parallel state itself.
    """
    import torch
    import torch.distributed as dist

    from slime_wf.checkpoint.dtypes import torch_dtype
    from slime_wf.training.model import build_gpt_model, forward_logits
    from slime_wf.training.parallel import destroy_parallel, init_parallel
    from slime_wf.training.weights import (
        SafetensorsCheckpoint,
        load_hf_checkpoint_into,
        megatron_to_hf,
        save_hf_checkpoint,
    )

    params_dtype = torch_dtype(dtype, "--dtype", choices=DTYPES)
    start = time.perf_counter()
    info = init_parallel(tp)
    try:
        model = build_gpt_model(hf_dir, params_dtype=params_dtype)
        load_hf_checkpoint_into(model, hf_dir)
        model.eval()
        arch = model.hf_arch
        input_ids, attention_mask = parity_batch(arch.vocab_size)
        device = info.device
        real = int(attention_mask[2].sum())
        with torch.no_grad():
            logits = forward_logits(model, input_ids.to(device), attention_mask.to(device)).float().cpu()
            alone = forward_logits(model, input_ids[2:3, :real].to(device)).float().cpu()
        exported = megatron_to_hf(model)
        if info.rank != 0:
            return None

        hf = _hf_logits(hf_dir, input_ids, attention_mask, params_dtype, device)
        keep = attention_mask.bool()
        max_abs_logit_diff = (logits - hf).abs()[keep].max().item()
        max_abs_pad_diff = (logits[2, :real] - alone[0]).abs().max().item()

        original = SafetensorsCheckpoint(hf_dir)
        mismatched = sorted(set(original) ^ set(exported))
        changed_by_dtype = []  # differ only because --dtype is narrower than the checkpoint
        for name in sorted(set(original) & set(exported)):
            reference = original[name]
            if not (exported[name].dtype == reference.dtype and torch.equal(exported[name], reference)):
                mismatched.append(name)
                if torch.equal(exported[name], reference.to(exported[name].dtype)):
                    changed_by_dtype.append(name)
        if export_dir:
            save_hf_checkpoint(exported, hf_dir, export_dir)
        return {
            "model_type": arch.model_type,
            "tp": info.tp_size,
            "dtype": dtype,
            "tied_embeddings": arch.tie_word_embeddings,
            "max_abs_logit_diff": max_abs_logit_diff,
            "max_abs_pad_diff": max_abs_pad_diff,
            "roundtrip_exact": not mismatched,
            "roundtrip_tensors": len(exported),
            "roundtrip_mismatched": mismatched[:20],
            "roundtrip_exact_in_model_dtype": sorted(mismatched) == sorted(changed_by_dtype),
            "export_dir": export_dir,
            "seconds": round(time.perf_counter() - start, 2),
        }
    finally:
        if dist.is_initialized():
            dist.barrier()
        destroy_parallel()


def _relaunch_under_torchrun(ns: argparse.Namespace) -> int:
    """Run this command under torchrun with `ns.tp` processes; print rank 0's report last."""
    with tempfile.TemporaryDirectory(prefix="hf-parity-") as tmp:
        result = os.path.join(tmp, "result.json")
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={ns.tp}",
            "-m",
            "slime_wf.training.hf_parity",
            "--hf-checkpoint",
            ns.hf_checkpoint,
            "--tp",
            str(ns.tp),
            "--dtype",
            ns.dtype,
            "--result-json",
            result,
        ]
        if ns.export_dir:
            cmd += ["--export-dir", ns.export_dir]
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        rc = subprocess.run(cmd, env=env, timeout=ns.timeout).returncode
        if rc != 0 or not os.path.exists(result):
            print(f"slime-wf hf-parity: torchrun exited with code {rc}", file=sys.stderr)
            return rc or 1
        with open(result) as f:
            print(f.read().strip())
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--hf-checkpoint", required=True, help="HF checkpoint directory (config.json + safetensors)"
    )
    parser.add_argument(
        "--tp", type=_positive_int, default=1, help="tensor-parallel size (>1 runs under torchrun)"
    )
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="parameter dtype of both models")
    parser.add_argument("--export-dir", default=None, help="also write the exported HF checkpoint here")
    parser.add_argument(
        "--timeout", type=float, default=1800, help="seconds before a torchrun relaunch is killed"
    )
    parser.add_argument("--result-json", default=None, help=argparse.SUPPRESS)


def main(ns: argparse.Namespace) -> int:
    from slime_wf.training.model import UnsupportedConfigError, check_tp_size, describe_hf_config

    # Check the config before starting any worker, so that bad input gets one clear line.
    try:
        check_tp_size(describe_hf_config(ns.hf_checkpoint), ns.tp)
    except (FileNotFoundError, UnsupportedConfigError) as err:
        print(f"slime-wf hf-parity: --hf-checkpoint {ns.hf_checkpoint!r}: {err}", file=sys.stderr)
        return 2
    if ns.tp > 1 and "WORLD_SIZE" not in os.environ:
        return _relaunch_under_torchrun(ns)
    report = run_hf_parity(ns.hf_checkpoint, tp=ns.tp, dtype=ns.dtype, export_dir=ns.export_dir)
    if report is None:
        return 0
    line = json.dumps(report)
    if ns.result_json:  # the torchrun parent prints it, after the workers' output
        with open(ns.result_json, "w") as f:
            f.write(line + "\n")
    else:
        print(line)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(prog="python -m slime_wf.training.hf_parity", description=__doc__)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
