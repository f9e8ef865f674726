"""Training throughput on CPU: slime-wf's Megatron train step against plain transformers.

    .venv/bin/python benchmarks/train.py [--layers 4] [--hidden 256] [--rollouts 3] [--threads 2]

A random Qwen3-shaped checkpoint (default 4 layers, hidden 256, vocab 4096, fp32) and rollouts of
16 samples with ragged lengths (prompts 16-96 tokens, responses 16-256) train with GRPO, one
optimizer step per rollout, micro-batches of up to `--max-tokens` padded tokens:

- megatron: `Trainer.train` (Megatron GPTModel, DDP, Megatron's Adam, the LR schedule);
- transformers: the same model in transformers (its default attention), the same micro-batches
  (`batching`), advantages and loss (`objectives.loss_function` on its logits), torch AdamW with
  the same settings and gradient clipping.

The two run interleaved in this process, one rollout at a time after a warm-up rollout each, and
each side's best rollout counts. tokens/s counts real (unpadded) tokens over the process's CPU
time (with one thread, the work done even on a machine shared with other jobs) and over the wall
time; the ratio is megatron / transformers.

A second table measures the layout choice: forward + backward of the Megatron model over the
same ragged samples, padded `[B, L]` micro-batches against packed `[1, T]` rows with a
block-diagonal causal mask, at several micro-batch sizes.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")


def make_checkpoint(out: Path, layers: int, hidden: int, vocab: int) -> Path:
    from transformers import AutoModelForCausalLM, Qwen3Config

    heads = max(2, hidden // 64)
    config = Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    return out


def make_rollout(seed: int, vocab: int, prompts: int = 2, n: int = 8):
    from slime_wf.types import Sample

    rng = random.Random(seed)
    samples = []
    for g in range(prompts):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(16, 96))]
        for i in range(n):
            response = [rng.randrange(vocab) for _ in range(rng.randint(16, 256))]
            samples.append(
                Sample(
                    group_index=g,
                    index=g * n + i,
                    tokens=prompt + response,
                    response_length=len(response),
                    reward=float(rng.random() < 0.5),
                )
            )
    return samples


class TransformersTrainer:
    """The baseline: the same work as `Trainer.train` with one step per rollout, on an HF model."""

    def __init__(self, args, hf_dir: Path):
        from transformers import AutoModelForCausalLM

        self.args = args
        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).train()
        decay = [p for n, p in self.model.named_parameters() if p.dim() > 1]
        no_decay = [p for n, p in self.model.named_parameters() if p.dim() <= 1]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=args.lr,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_eps,
        )

    def train(self, samples) -> dict:
        from slime_wf.training.batching import items_from_samples, make_micro_batches, pad_micro_batch
        from slime_wf.training.objectives import loss_function, step_normalizer
        from slime_wf.training.train_step import set_advantages

        start = time.perf_counter()
        items = items_from_samples(samples, self.args)
        set_advantages(items, self.args)
        normalizer = step_normalizer([it.loss_mask for it in items], self.args.calculate_per_token_loss)
        self.optimizer.zero_grad()
        for group in make_micro_batches(items, max_tokens_per_gpu=self.args.max_tokens_per_gpu):
            mb = pad_micro_batch(group)
            logits = self.model(
                input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids
            ).logits
            loss, _ = loss_function(self.args, mb.loss_batch(), logits, normalizer=normalizer)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip_grad)
        self.optimizer.step()
        return {"tokens": float(sum(it.total_length for it in items)), "seconds": time.perf_counter() - start}


def _timed(fn):
    """(result, wall seconds, CPU seconds of this process): on a shared machine the CPU time, with
    one thread, is the work done, while the wall time also counts waiting for other processes."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def compare_training(hf_dir: Path, opts) -> dict[str, dict[str, float]]:
    from slime_wf.training.trainer import Trainer

    settings = dict(
        rollout_batch_size=2,
        n_samples_per_prompt=8,
        lr=1e-5,
        max_tokens_per_gpu=opts.max_tokens,
        num_rollout=opts.rollouts + 1,
        seed=0,
    )
    megatron = Trainer(settings, hf_dir)
    baseline = TransformersTrainer(megatron.args, hf_dir)
    best = {name: {"wall": 0.0, "cpu": 0.0} for name in ("megatron", "transformers")}
    try:
        for k in range(opts.rollouts + 1):
            samples = make_rollout(k, opts.vocab)
            tokens = sum(len(s.tokens) for s in samples)
            rates = {}
            for name, train in (
                ("megatron", lambda s=samples, k=k: megatron.train(s, k)),
                ("transformers", lambda s=samples: baseline.train(s)),
            ):
                _, wall, cpu = _timed(train)
                rates[name] = {"wall": tokens / wall, "cpu": tokens / cpu}
                if k > 0:
                    for clock in ("wall", "cpu"):
                        best[name][clock] = max(best[name][clock], rates[name][clock])
            print(
                f"  rollout {k}{' (warm-up)' if k == 0 else ''}: {tokens} tokens; tokens/s (wall, cpu): "
                + ", ".join(f"{n} {r['wall']:.0f}, {r['cpu']:.0f}" for n, r in rates.items()),
                flush=True,
            )
    finally:
        megatron.shutdown()
    return best


def compare_layouts(hf_dir: Path, opts) -> list[tuple[int, float, float]]:
    from slime_wf.training.batching import items_from_samples, make_micro_batches, pad_micro_batch
    from slime_wf.training.model import build_gpt_model, forward_logits
    from slime_wf.training.parallel import destroy_parallel, init_parallel
    from slime_wf.training.train_args import resolve_train_args

    init_parallel(1, seed=0)
    try:
        model = build_gpt_model(hf_dir)
        items = items_from_samples(
            make_rollout(99, opts.vocab),
            resolve_train_args(dict(rollout_batch_size=2, n_samples_per_prompt=8)),
        )
        tokens = sum(it.total_length for it in items)

        def padded(group):
            mb = pad_micro_batch(group)
            return forward_logits(model, mb.input_ids, mb.attention_mask, mb.position_ids)

        def packed(group):
            lengths = torch.tensor([it.total_length for it in group])
            ids = torch.cat([it.tokens for it in group])[None]
            positions = torch.cat([torch.arange(int(n)) for n in lengths])[None]
            segment = torch.repeat_interleave(torch.arange(len(group)), lengths)
            causal = torch.ones(len(segment), len(segment), dtype=torch.bool).tril()
            blocked = ~((segment[:, None] == segment[None, :]) & causal)
            return model(ids, positions, blocked[None, None], runtime_gather_output=True)

        def seconds(fn, batches):
            start = time.process_time()
            for group in batches:
                fn(group).float().logsumexp(-1).mean().backward()
            return time.process_time() - start

        rows = []
        for size in opts.layout_batch_sizes:
            batches = make_micro_batches(items, micro_batch_size=size)
            best = {"padded": float("inf"), "packed": float("inf")}
            for _ in range(3):
                for name, fn in (("padded", padded), ("packed", packed)):
                    best[name] = min(best[name], seconds(fn, batches))
            rows.append((size, tokens / best["padded"], tokens / best["packed"]))
            print(
                f"  micro-batch {size}: padded {rows[-1][1]:.0f} tok/s, packed {rows[-1][2]:.0f} tok/s",
                flush=True,
            )
        return rows
    finally:
        destroy_parallel()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--rollouts", type=int, default=4, help="timed rollouts per side (after a warm-up)")
    parser.add_argument(
        "--max-tokens", type=int, default=2048, help="max_tokens_per_gpu of the micro-batches"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layout-batch-sizes", type=int, nargs="*", default=[2, 8])
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = make_checkpoint(Path(tmp) / "qwen3", opts.layers, opts.hidden, opts.vocab)
        print(
            f"Qwen3 {opts.layers} layers, hidden {opts.hidden}, vocab {opts.vocab}, fp32, "
            f"{opts.threads} threads; GRPO, 16 samples per rollout, max_tokens_per_gpu={opts.max_tokens}"
        )
        training = compare_training(hf_dir, opts)
        layouts = compare_layouts(hf_dir, opts) if opts.layout_batch_sizes else []

    base = training["transformers"]
    print(
        "\n| impl | tokens/s (cpu time) | ratio | tokens/s (wall) | ratio |\n| --- | --- | --- | --- | --- |"
    )
    for name, rate in training.items():
        print(
            f"| {name} | {rate['cpu']:.0f} | {rate['cpu'] / base['cpu']:.2f} | {rate['wall']:.0f} | "
            f"{rate['wall'] / base['wall']:.2f} |"
        )
    if layouts:
        print(
            "\n| layout (Megatron fwd+bwd) | micro-batch | tokens/s (cpu time) | ratio to padded |\n| --- | --- | --- | --- |"
        )
        for size, pad_tps, pack_tps in layouts:
            print(f"| padded | {size} | {pad_tps:.0f} | 1.00 |")
            print(f"| packed | {size} | {pack_tps:.0f} | {pack_tps / pad_tps:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
