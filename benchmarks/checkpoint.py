"""Checkpoint benchmarks: BF16 -> FP8 conversion throughput against a straightforward converter.

    .venv/bin/python benchmarks/checkpoint.py [--size-mb 500] [--shards 5] [--repeats 2]

Generates a bf16 checkpoint with Qwen3-style names and shapes (random weights) in a temp dir, then
converts it with

- baseline: one shard at a time, `safetensors.torch.load_file` the whole shard, quantize every
  weight with the plain pad / abs / max / divide / clamp / cast recipe, `save_file` the shard;
- baseline, 2 processes: the same, two shards at a time in spawned processes (its time includes
  starting them: each imports torch);
- slime_wf.checkpoint.fp8_convert.convert_checkpoint with 1 and with 2 worker threads,

each in its own subprocess (so peak RSS is per implementation), alternating implementations for
`--repeats` rounds and keeping each one's best time. MB/s counts input bytes. Every output is
checked tensor for tensor (bit for bit) against the baseline's before the table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

# ---- the straightforward baseline ---------------------------------------------------------------


def baseline_block_fp8(weight: torch.Tensor, block=(128, 128)):
    import torch.nn.functional as F

    bn, bk = block
    n, k = weight.shape
    nt, kt = -(-n // bn), -(-k // bk)
    padded = F.pad(weight, (0, kt * bk - k, 0, nt * bn - n)).reshape(nt, bn, kt, bk)
    amax = padded.abs().amax(dim=(1, 3), keepdim=True).to(torch.float32)
    scale = amax.clamp(min=1e-12) / 448.0
    q = (padded / scale).clamp(-448.0, 448.0).reshape(nt * bn, kt * bk).to(torch.float8_e4m3fn)
    return q[:n, :k].contiguous(), scale.reshape(nt, kt)


def baseline_shard(src: str, dst: str) -> int:
    from safetensors.torch import load_file, save_file

    from slime_wf.checkpoint.fp8 import should_quantize

    out = {}
    for name, tensor in load_file(src).items():
        if should_quantize(name, tensor):
            out[name], out[name + "_scale_inv"] = baseline_block_fp8(tensor)
        else:
            out[name] = tensor
    save_file(out, dst, metadata={"format": "pt"})
    return peak_rss_kb()


def baseline_convert(model_dir: str, save_dir: str, processes: int = 1) -> int:
    """Converts every shard; returns the largest peak RSS (kB) of the worker processes (0 without any)."""
    os.makedirs(save_dir, exist_ok=True)
    shards = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
    pairs = [(os.path.join(model_dir, n), os.path.join(save_dir, n)) for n in shards]
    if processes == 1:
        for src, dst in pairs:
            baseline_shard(src, dst)
        return 0
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(
        processes, mp_context=mp.get_context("spawn"), initializer=torch.set_num_threads, initargs=(1,)
    ) as pool:
        return max(pool.map(baseline_shard, *zip(*pairs, strict=True)))


# ---- the generated checkpoint -------------------------------------------------------------------


def layer_shapes(
    hidden: int, inter: int, heads: int, kv_heads: int, head_dim: int
) -> dict[str, tuple[int, ...]]:
    return {
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (heads * head_dim, hidden),
        "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.o_proj.weight": (hidden, heads * head_dim),
        "self_attn.q_norm.weight": (head_dim,),
        "self_attn.k_norm.weight": (head_dim,),
        "post_attention_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }


def generate_checkpoint(out_dir: str, size_mb: int, n_shards: int) -> int:
    """A Qwen3-shaped bf16 checkpoint of about `size_mb` MB in `n_shards` shards; returns its tensor bytes."""
    from safetensors.torch import save_file

    hidden, inter, vocab, heads, kv_heads, head_dim = 1024, 3072, 32000, 8, 2, 128
    per_layer = sum(_numel(s) for s in layer_shapes(hidden, inter, heads, kv_heads, head_dim).values()) * 2
    layers = max(1, (size_mb * 10**6 - 2 * vocab * hidden * 2) // per_layer)
    tensors: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        tensors += [
            (f"model.layers.{i}.{k}", s)
            for k, s in layer_shapes(hidden, inter, heads, kv_heads, head_dim).items()
        ]
    tensors += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    total = sum(_numel(s) * 2 for _, s in tensors)
    target, shard, shard_bytes, weight_map, files = total / n_shards, {}, 0, {}, []
    gen = torch.Generator().manual_seed(0)

    def flush():
        name = f"model-{len(files) + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        files.append(name)

    for name, shape in tensors:
        std = 1.0 if name.endswith("norm.weight") else 0.02
        shard[name] = (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)
        shard_bytes += _numel(shape) * 2
        if shard_bytes >= target and len(files) < n_shards - 1:
            flush()
            shard, shard_bytes = {}, 0
    if shard:
        flush()
    for i, name in enumerate(files):  # names say "of N" with the real N
        real = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        os.replace(os.path.join(out_dir, name), os.path.join(out_dir, real))
        weight_map = {k: (real if v == name else v) for k, v in weight_map.items()}
    config = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "torch_dtype": "bfloat16",
    }
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return total


def peak_rss_kb() -> int:
    # VmHWM belongs to this process image; ru_maxrss would also count what a forking parent held.
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ---- running and checking -----------------------------------------------------------------------

IMPLS = {
    "baseline": "baseline (load_file / quantize / save_file)",
    "baseline-2proc": "baseline, 2 processes",
    "slime_wf-1": "slime_wf convert_checkpoint, 1 worker",
    "slime_wf-2": "slime_wf convert_checkpoint, 2 workers",
}


def run_one(impl: str, model_dir: str, save_dir: str) -> dict:
    """Runs in a subprocess: one conversion, timed; prints a JSON line."""
    start, cpu_start = time.perf_counter(), cpu_seconds()
    workers_kb = 0
    if impl == "baseline":
        baseline_convert(model_dir, save_dir)
    elif impl == "baseline-2proc":
        workers_kb = baseline_convert(model_dir, save_dir, processes=2)
    else:
        from slime_wf.checkpoint.fp8_convert import convert_checkpoint

        convert_checkpoint(
            model_dir,
            save_dir,
            "block",
            (128, 128),
            max_workers=int(impl.rsplit("-", 1)[1]),
            progress=False,
            overwrite=True,
        )
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds() - cpu_start,
        "peak_rss_mb": max(peak_rss_kb(), workers_kb) / 1024,
    }


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the process pool's workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def spawn(impl: str, model_dir: str, save_dir: str) -> dict:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--run-one", impl, model_dir, save_dir], stdout=subprocess.PIPE, text=True
    )
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{impl} failed with exit code {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def same_tensors(dir_a: str, dir_b: str) -> tuple[bool, int]:
    """(all tensors bit-identical with the same names, number of tensors compared)."""
    from safetensors import safe_open

    def index(d):
        out = {}
        for f in sorted(os.listdir(d)):
            if f.endswith(".safetensors"):
                with safe_open(os.path.join(d, f), "pt") as h:
                    out.update({k: os.path.join(d, f) for k in h.keys()})
        return out

    a, b = index(dir_a), index(dir_b)
    if set(a) != set(b):
        return False, 0
    for name in a:
        with safe_open(a[name], "pt") as ha, safe_open(b[name], "pt") as hb:
            ta, tb = ha.get_tensor(name), hb.get_tensor(name)
        if ta.dtype != tb.dtype or ta.shape != tb.shape:
            return False, 0
        if not torch.equal(ta.reshape(-1).view(torch.uint8), tb.reshape(-1).view(torch.uint8)):
            return False, 0
    return True, len(a)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--run-one":
        impl, model_dir, save_dir = sys.argv[2:5]
        print(json.dumps(run_one(impl, model_dir, save_dir)))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=500)
    parser.add_argument("--shards", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-fp8-") as tmp:
        model_dir = os.path.join(tmp, "bf16")
        os.makedirs(model_dir)
        t0 = time.perf_counter()
        total = generate_checkpoint(model_dir, args.size_mb, args.shards)
        shards = len([n for n in os.listdir(model_dir) if n.endswith(".safetensors")])
        print(
            f"checkpoint: {total / 1e6:.0f} MB bf16 in {shards} shards, generated in {time.perf_counter() - t0:.1f}s;"
            f" {os.cpu_count()} CPUs, torch {torch.__version__}"
        )
        best: dict[str, dict] = {}
        for _ in range(args.repeats):
            for impl in args.impls:
                save_dir = os.path.join(tmp, impl)
                result = spawn(impl, model_dir, save_dir)
                if impl not in best or result["seconds"] < best[impl]["seconds"]:
                    best[impl] = result
        reference = os.path.join(tmp, args.impls[0])
        identical = {impl: same_tensors(reference, os.path.join(tmp, impl)) for impl in args.impls[1:]}

    base = best[args.impls[0]]["seconds"]
    print(f"\nFP8 block conversion (128x128), best of {args.repeats}; MB/s of bf16 input")
    print(
        f"| {'impl':<44} | {'seconds':>7} | {'MB/s':>6} | {'ratio':>5} | {'CPU s':>5} | {'peak RSS MB':>11} |"
    )
    print(f"|{'-' * 46}|{'-' * 9}|{'-' * 8}|{'-' * 7}|{'-' * 7}|{'-' * 13}|")
    for impl in args.impls:
        r = best[impl]
        print(
            f"| {IMPLS[impl]:<44} | {r['seconds']:7.2f} | {total / 1e6 / r['seconds']:6.0f} | "
            f"{base / r['seconds']:5.2f} | {r['cpu_seconds']:5.1f} | {r['peak_rss_mb']:11.0f} |"
        )
    print(
        "(CPU s: user + system time, which other load on the machine disturbs less than wall time;"
        " peak RSS includes ~220 MB of imported torch)"
    )
    for impl, (ok, n) in identical.items():
        print(
            f"{impl}: output {'identical to' if ok else 'DIFFERS from'} {args.impls[0]} ({n} tensors compared)"
        )
    if not all(ok for ok, _ in identical.values()):
        raise SystemExit(1)
    # Weight sync seconds per GB (trainer -> disk -> engines) is measured by benchmarks/weight_sync.py.


if __name__ == "__main__":
    main()
