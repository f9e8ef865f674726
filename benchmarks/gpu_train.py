"""Training throughput and MFU of the Megatron train step on one GPU (bf16), Qwen3-0.6B-shaped.

    python benchmarks/gpu_train.py [--samples 64] [--budgets 8192 16384] [--rollouts 3]
    python benchmarks/gpu_train.py --tiny --allow-cpu     # a smoke run of the same code on CPU

Needs torch and megatron-core (plus slime_wf.training, which imports nothing else heavy); builds
a random model with Qwen3-0.6B's shape (28 layers, hidden 1024, 16 query / 8 KV heads of 128,
MLP 3072, vocabulary 151936, tied embeddings), no checkpoint, no tokenizer. Each rollout is
`--samples` samples with ragged lengths (prompts 64-512 tokens, responses 128-`--max-response`)
trained with GRPO, one optimizer step per rollout (Megatron DDP + Megatron's Adam with fp32 main
weights), micro-batches of at most `--budgets` padded tokens. After a warm-up rollout, the best
of `--rollouts` counts.

MFU = model FLOPs / (time x peak bf16 FLOP/s). Model FLOPs per sample of n real tokens:
6 x n x (weights of all matmuls, LM head included) + 12 x n^2 x layers x (heads x head_dim)
(attention scores and values, forward and backward, without the causal half saved). Peak:
989 TFLOP/s for H100/H200 (dense bf16), 312 for A100, else `--peak-tflops`.
Without a GPU the script says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")

QWEN3_0_6B = dict(
    model_type="qwen3",
    vocab_size=151936,
    hidden_size=1024,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=3072,
    max_position_embeddings=40960,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
TINY = dict(
    QWEN3_0_6B,
    vocab_size=1024,
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    intermediate_size=256,
)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0}


def matmul_weights(cfg: dict) -> int:
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    per_layer = h * (q + 2 * kv) + q * h + h * 2 * f + f * h
    return cfg["num_hidden_layers"] * per_layer + cfg["vocab_size"] * h


def model_flops(cfg: dict, lengths: list[int]) -> float:
    attn_width = cfg["num_attention_heads"] * cfg["head_dim"]
    dense = 6.0 * matmul_weights(cfg) * sum(lengths)
    attention = 12.0 * cfg["num_hidden_layers"] * attn_width * sum(n * n for n in lengths)
    return dense + attention


def make_samples(seed: int, count: int, vocab: int, max_prompt: int, max_response: int, group: int = 8):
    from slime_wf.types import Sample

    rng = random.Random(seed)
    samples = []
    for g in range(count // group):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(min(64, max_prompt), max_prompt))]
        for i in range(group):
            response = [
                rng.randrange(vocab) for _ in range(rng.randint(min(128, max_response), max_response))
            ]
            samples.append(
                Sample(
                    group_index=g,
                    index=g * group + i,
                    tokens=prompt + response,
                    response_length=len(response),
                    reward=float(rng.random() < 0.5),
                )
            )
    return samples


def train_args(opts, budget: int):
    """The flat settings train_step reads (what resolve_train_args derives from a campaign)."""
    from slime_wf.training.objectives import resolve_objective_args

    return resolve_objective_args(
        dict(
            rollout_batch_size=opts.samples // 8,
            n_samples_per_prompt=8,
            global_batch_size=opts.samples,
            num_steps_per_rollout=1,
            micro_batch_size=1,
            max_tokens_per_gpu=budget,
            lr=1e-6,
            min_lr=0.0,
            lr_warmup_iters=0,
            lr_decay_style="constant",
            lr_decay_iters=100,
            weight_decay=0.01,
            reward_key=None,
        ),
        advantage_estimator="grpo",
    )


def measure(opts, cfg: dict, budget: int, dtype: torch.dtype) -> dict:
    from slime_wf.training.batching import items_from_samples
    from slime_wf.training.model import build_gpt_model
    from slime_wf.training.optimizer import build_optimizer, build_scheduler
    from slime_wf.training.parallel import destroy_parallel, init_parallel
    from slime_wf.training.train_step import DataParallel, train_rollout

    info = init_parallel(1, seed=0)
    try:
        overrides = {}
        if opts.recompute_attention:
            overrides = dict(recompute_granularity="selective", recompute_modules=["core_attn"])
        model = build_gpt_model(cfg, params_dtype=dtype, **overrides)
        args = train_args(opts, budget)
        ddp_model, optimizer = build_optimizer(
            model, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay
        )
        scheduler = build_scheduler(optimizer, args)
        if info.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(info.device)
        best = None
        for k in range(opts.rollouts + 1):
            samples = make_samples(k, opts.samples, cfg["vocab_size"], opts.max_prompt, opts.max_response)
            lengths = [len(s.tokens) for s in samples]
            items = items_from_samples(samples, args)
            if info.device.type == "cuda":
                torch.cuda.synchronize(info.device)
            start = time.perf_counter()
            metrics = train_rollout(
                ddp_model=ddp_model,
                optimizer=optimizer,
                scheduler=scheduler,
                ref_model=None,
                items=items,
                args=args,
                dp=DataParallel(),
                device=info.device,
            )
            seconds = time.perf_counter() - start
            result = {
                "tokens_per_s": sum(lengths) / seconds,
                "tflops": model_flops(cfg, lengths) / seconds / 1e12,
                "seconds": seconds,
                "padding": metrics["padding_fraction"],
            }
            print(
                f"  budget {budget}, rollout {k}{' (warm-up)' if k == 0 else ''}: {sum(lengths)} tokens in "
                f"{seconds:.2f}s, {result['tokens_per_s']:.0f} tokens/s, {result['tflops']:.1f} TFLOP/s, "
                f"loss {metrics.get('loss', float('nan')):.4f}",
                flush=True,
            )
            if k > 0 and (best is None or result["tokens_per_s"] > best["tokens_per_s"]):
                best = result
        if info.device.type == "cuda":
            best["peak_gib"] = torch.cuda.max_memory_allocated(info.device) / 2**30
        return best
    finally:
        destroy_parallel()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=64, help="samples per rollout (a multiple of 8)")
    parser.add_argument("--max-prompt", type=int, default=512)
    parser.add_argument("--max-response", type=int, default=2048)
    parser.add_argument(
        "--budgets", type=int, nargs="+", default=[8192, 16384], help="max_tokens_per_gpu values to measure"
    )
    parser.add_argument("--rollouts", type=int, default=3, help="timed rollouts per budget (after a warm-up)")
    parser.add_argument(
        "--recompute-attention",
        action="store_true",
        help="recompute core attention in backward (Megatron's selective recompute)",
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s of the GPU")
    parser.add_argument("--tiny", action="store_true", help="a tiny model instead of Qwen3-0.6B's shape")
    parser.add_argument("--allow-cpu", action="store_true", help="run on CPU in float32 (a smoke test)")
    opts = parser.parse_args(argv)
    if opts.samples % 8:
        parser.error("--samples must be a multiple of 8 (groups of 8)")

    on_gpu = torch.cuda.is_available()
    if not on_gpu and not opts.allow_cpu:
        print(
            "gpu_train: no CUDA device here; nothing to measure (run it on a GPU machine, or pass --allow-cpu "
            "--tiny for a smoke run)"
        )
        return 0
    if not on_gpu and opts.recompute_attention:
        parser.error("--recompute-attention needs a GPU (Megatron's recompute forks the CUDA RNG tracker)")
    cfg = TINY if opts.tiny else QWEN3_0_6B
    dtype = torch.bfloat16 if on_gpu else torch.float32
    name = torch.cuda.get_device_name(0) if on_gpu else "CPU"
    peak = opts.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    print(
        f"{'tiny' if opts.tiny else 'Qwen3-0.6B'}-shaped model, {matmul_weights(cfg) / 1e6:.1f}M matmul weights, "
        f"{dtype}, on {name}; {opts.samples} samples per rollout, prompts <= {opts.max_prompt}, "
        f"responses <= {opts.max_response}"
    )
    rows = [(budget, measure(opts, cfg, budget, dtype)) for budget in opts.budgets]

    print("\n| max_tokens_per_gpu | tokens/s | TFLOP/s | MFU | padding | peak memory (GiB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for budget, r in rows:
        mfu = f"{r['tflops'] / peak:.1%}" if peak else "n/a (pass --peak-tflops)"
        memory = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "n/a"
        print(
            f"| {budget} | {r['tokens_per_s']:.0f} | {r['tflops']:.1f} | {mfu} | {r['padding']:.1%} | {memory} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
