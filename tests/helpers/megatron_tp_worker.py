"""Tensor-parallel worker for tests/e2e/test_megatron_tp.py, run under torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/helpers/megatron_tp_worker.py \
        --hf-dir DIR --out DIR

Builds the model at TP = world size from the HF checkpoint, records logits, exports the
weights back to HF, runs a few optimizer steps, saves a distributed checkpoint, runs one more
step, and writes everything rank 0 saw to OUT/results.pt. The test repeats the same work at
TP=1 in its own process (with the helpers below) and compares.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

STEPS_BEFORE_SAVE = 3
LR = 1e-2


def batch(vocab_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch with one right-padded row."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (4, 12), generator=gen)
    mask = torch.ones_like(input_ids)
    mask[3, 7:] = 0
    return input_ids, mask


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting each real token from the ones before it."""
    targets = input_ids[:, 1:]
    keep = mask[:, 1:].bool()
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    ).view_as(targets)
    return per_token[keep].mean()


def train_step(ddp_model, optimizer, input_ids, mask) -> float:
    from slime_wf.training.model import forward_logits

    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()
    loss = next_token_loss(forward_logits(ddp_model, input_ids, mask), input_ids, mask)
    loss.backward()
    ddp_model.finish_grad_sync()
    ok, _, _ = optimizer.step()
    assert ok, "optimizer step was skipped"
    return loss.item()


def main() -> None:
    from slime_wf.training.checkpointing import save_checkpoint
    from slime_wf.training.model import build_gpt_model, forward_logits
    from slime_wf.training.optimizer import build_optimizer
    from slime_wf.training.parallel import destroy_parallel, init_parallel
    from slime_wf.training.weights import SafetensorsCheckpoint, load_hf_checkpoint_into, megatron_to_hf

    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)

    import torch.distributed as dist

    world = int(__import__("os").environ["WORLD_SIZE"])
    info = init_parallel(tp_size=world, seed=0)
    try:
        model = build_gpt_model(args.hf_dir)
        load_hf_checkpoint_into(model, args.hf_dir)
        input_ids, mask = batch(model.hf_arch.vocab_size)
        with torch.no_grad():
            logits = forward_logits(model, input_ids, mask)
        exported = megatron_to_hf(model)
        original = SafetensorsCheckpoint(args.hf_dir)
        mismatched = sorted(set(original) ^ set(exported)) + [
            k for k in sorted(set(original) & set(exported)) if not torch.equal(original[k], exported[k])
        ]

        ddp_model, optimizer = build_optimizer(model, lr=LR, clip_grad=1.0)
        losses = [train_step(ddp_model, optimizer, input_ids, mask) for _ in range(STEPS_BEFORE_SAVE)]
        with torch.no_grad():
            logits_at_save = forward_logits(model, input_ids, mask)
        weights_at_save = megatron_to_hf(model)
        save_checkpoint(
            Path(args.out) / "ckpt", ddp_model, optimizer, step=STEPS_BEFORE_SAVE, extra={"tp": world}
        )
        loss_after_save = train_step(ddp_model, optimizer, input_ids, mask)
        if info.rank == 0:
            torch.save(
                {
                    "tp": info.tp_size,
                    "logits": logits,
                    "export_mismatched": mismatched,
                    "export_count": len(exported),
                    "losses": losses,
                    "logits_at_save": logits_at_save,
                    "weights_at_save": weights_at_save,
                    "loss_after_save": loss_after_save,
                },
                Path(args.out) / "results.pt",
            )
        dist.barrier()
    finally:
        destroy_parallel()


if __name__ == "__main__":
    main()
