"""Megatron-core policy model on CPU against the same model in transformers (the baseline).

    .venv/bin/python benchmarks/megatron_model.py [--batch 4] [--seq 128] [--iters 20] [--threads 1]

Builds a tiny Qwen3 checkpoint (2 layers, hidden 64, vocab 130, fp32) in a temp dir and times

- import: a fresh interpreter importing what each side needs to build its model (best of 3);
- forward: logits for a [batch, seq] batch, no grad;
- train step: forward + next-token loss + backward + Adam step (transformers: torch AdamW on
  .grad; Megatron: DDP + Megatron's optimizer, which is what slime-wf trains with);
- weight export: all weights as HF-named tensors (Megatron -> HF conversion vs `state_dict()`).

Medians over `--iters` after 3 warm-up iterations, both sides in this process with the same
thread count. The ratio column is Megatron / transformers.
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

IMPORTS = {
    "transformers": "from transformers import AutoModelForCausalLM; import transformers.models.qwen3.modeling_qwen3",
    "megatron": (
        "from slime_wf.training import model, weights, optimizer, checkpointing, parallel; "
        "from slime_wf.training.parallel import init_parallel; init_parallel(1); "
        "import megatron.core.models.gpt, megatron.core.optimizer, megatron.core.dist_checkpointing"
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from helpers.megatron_helpers import make_hf_checkpoint
    from transformers import AutoModelForCausalLM

    from slime_wf.training.model import build_gpt_model, forward_logits
    from slime_wf.training.optimizer import build_optimizer
    from slime_wf.training.parallel import destroy_parallel, init_parallel
    from slime_wf.training.weights import load_hf_checkpoint_into, megatron_to_hf

    rows = [
        (
            "import (fresh process), s",
            import_seconds(IMPORTS["transformers"]),
            import_seconds(IMPORTS["megatron"]),
        )
    ]
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = make_hf_checkpoint(Path(tmp) / "qwen3", "qwen3", tied=False)
        ids = torch.randint(0, 130, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

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
        finally:
            destroy_parallel()

    print(f"tiny Qwen3 (2 layers, hidden 64), batch {args.batch}x{args.seq}, fp32, {args.threads} thread(s)")
    print(f"| {'measure':<32} | {'transformers':>12} | {'megatron':>10} | {'ratio':>6} |")
    print(f"|{'-' * 34}|{'-' * 14}|{'-' * 12}|{'-' * 8}|")
    for name, base, ours in rows:
        print(f"| {name:<32} | {base:>12.2f} | {ours:>10.2f} | {ours / base:>6.2f} |")


if __name__ == "__main__":
    main()
