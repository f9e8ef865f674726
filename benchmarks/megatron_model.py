"""Megatron-core policy model on CPU against the same model in transformers (the baseline).

    .venv/bin/python benchmarks/megatron_model.py [--batch 4] [--seq 128] [--iters 20] [--threads 1]
        [--shape tiny|12m]

Builds a random Qwen3 checkpoint (`tiny`: 2 layers, hidden 64, vocab 130; `12m`: vs_trl.py's 12m
model, 4 layers, hidden 512, vocab 5400; fp32) in a temp dir and times

- import: a fresh interpreter importing what each side needs to build its model (best of 3);
- forward: logits for a [batch, seq] batch, no grad;
- train step: forward + next-token loss + backward + Adam step (transformers: torch AdamW on
  .grad; Megatron: DDP + Megatron's optimizer, which is what slime-wf trains with);
- weight export: all weights as HF-named tensors (Megatron -> HF conversion vs `state_dict()`).

Medians over `--iters` after 3 warm-up iterations, both sides in this process with the same
thread count. The ratio column is Megatron / transformers.

A second table sets two of slime-wf's choices against Megatron's defaults (ratio: slime-wf's /
Megatron's default):
- import: megatron-core through `cpu_shim.import_megatron`, which keeps its unused fused kernels away
  from `torch.compile`, against a plain import (which hands them to it and so imports Inductor's
  compiler); fresh interpreters, best of 3;
- train step: the output layer of `model.build_gpt_model` (logits over the HF vocabulary only, in
  [b, s] order) against Megatron's own (`[s, b, padded vocabulary]`, copied and cropped); the same
  model, its layer's class swapped back, the two alternating step by step.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

_MEGATRON_IMPORTS = (
    "from slime_wf.training import model, weights, optimizer, checkpointing, parallel; "
    "from slime_wf.training.parallel import init_parallel; init_parallel(1); "
    "import megatron.core.models.gpt, megatron.core.optimizer, megatron.core.dist_checkpointing"
)
IMPORTS = {
    "transformers": "from transformers import AutoModelForCausalLM; import transformers.models.qwen3.modeling_qwen3",
    # as the trainer's entry points import it
    "megatron": "from slime_wf.training import cpu_shim; cpu_shim.import_megatron(); " + _MEGATRON_IMPORTS,
    # megatron-core imported before slime-wf's modules can route it through cpu_shim
    "megatron, plain import": "import megatron.core.models.gpt; " + _MEGATRON_IMPORTS,
}
SHAPES = {
    "tiny": {},  # tests/helpers/megatron_helpers.py's tiny_hf_config
    "12m": dict(
        vocab_size=5400,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=4096,
    ),
}


def import_seconds(code: str, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-W", "ignore", "-c", code], check=True, capture_output=True)
        best = min(best, time.perf_counter() - start)
    return best


def median_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def alternating_ms(fn_a, fn_b, iters: int) -> tuple[float, float]:
    """Medians of `fn_a` and `fn_b` called in turn, so that both meet the same moments of the machine."""
    for _ in range(2):
        fn_a()
        fn_b()
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(iters):
        for k in (0, 1) if i % 2 == 0 else (1, 0):
            start = time.perf_counter()
            (fn_a, fn_b)[k]()
            times[k].append((time.perf_counter() - start) * 1000)
    return statistics.median(times[0]), statistics.median(times[1])


def loss_of(logits, ids):
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from helpers.megatron_helpers import make_hf_checkpoint
    from transformers import AutoModelForCausalLM

    from slime_wf.training.model import build_gpt_model, forward_logits
    from slime_wf.training.optimizer import build_optimizer
    from slime_wf.training.parallel import destroy_parallel, init_parallel
    from slime_wf.training.weights import load_hf_checkpoint_into, megatron_to_hf

    megatron_import = import_seconds(IMPORTS["megatron"])
    rows = [("import (fresh process), s", import_seconds(IMPORTS["transformers"]), megatron_import)]
    choices = [
        ("import (fresh process), s", import_seconds(IMPORTS["megatron, plain import"]), megatron_import)
    ]
    shape = SHAPES[args.shape]
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = make_hf_checkpoint(Path(tmp) / "qwen3", "qwen3", tied=False, **shape)
        vocab = shape.get("vocab_size", 130)
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
        hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.0)

        def hf_forward():
            with torch.no_grad():
                return hf(input_ids=ids).logits

        def hf_step():
            hf_opt.zero_grad()
            loss_of(hf(input_ids=ids).logits, ids).backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
            hf_opt.step()

        init_parallel(1, seed=0)
        try:
            model = build_gpt_model(hf_dir)
            load_hf_checkpoint_into(model, hf_dir)
            ddp_model, optimizer = build_optimizer(model, lr=1e-4, clip_grad=1.0)

            def mg_forward():
                with torch.no_grad():
                    forward_logits(ddp_model, ids)

            def mg_step():
                ddp_model.zero_grad_buffer()
                optimizer.zero_grad()
                loss_of(forward_logits(ddp_model, ids), ids).backward()
                ddp_model.finish_grad_sync()
                optimizer.step()

            for name, hf_fn, mg_fn in (
                ("forward, ms", hf_forward, mg_forward),
                ("train step (fwd+bwd+Adam), ms", hf_step, mg_step),
                ("weight export to HF names, ms", lambda: hf.state_dict(), lambda: megatron_to_hf(model)),
            ):
                rows.append((name, median_ms(hf_fn, args.iters), median_ms(mg_fn, args.iters)))

            layer = model.output_layer
            ours_cls = type(layer)
            megatron_cls = ours_cls.__mro__[1]  # the ColumnParallelLinear that build_gpt_model swapped out

            def step_with(cls):
                def step():
                    layer.__class__ = cls
                    mg_step()

                return step

            ours_ms, megatron_ms = alternating_ms(step_with(ours_cls), step_with(megatron_cls), args.iters)
            layer.__class__ = ours_cls
            choices.append(("train step, output layer, ms", megatron_ms, ours_ms))
        finally:
            destroy_parallel()

    print(f"Qwen3 {args.shape}, batch {args.batch}x{args.seq}, fp32, {args.threads} thread(s)")
    print(f"| {'measure':<32} | {'transformers':>12} | {'megatron':>10} | {'ratio':>6} |")
    print(f"|{'-' * 34}|{'-' * 14}|{'-' * 12}|{'-' * 8}|")
    for name, base, ours in rows:
        print(f"| {name:<32} | {base:>12.2f} | {ours:>10.2f} | {ours / base:>6.2f} |")
    print()
    print(f"| {'slime-wf choice':<32} | {'megatron default':>16} | {'slime-wf':>10} | {'ratio':>6} |")
    print(f"|{'-' * 34}|{'-' * 18}|{'-' * 12}|{'-' * 8}|")
    for name, base, ours in choices:
        print(f"| {name:<32} | {base:>16.2f} | {ours:>10.2f} | {ours / base:>6.2f} |")


if __name__ == "__main__":
    main()
