"""The critic of PPO: a Megatron GPTModel whose output layer is a value head, trained with the
clipped value loss next to the policy.

It is built like the policy from the HF checkpoint (the transformer body comes from it, or from
`critic_load`); the vocabulary output layer is replaced by a map hidden -> 1 that starts at zero
(`model.ValueHead`), so the first values are 0 and the first advantages are the plain discounted
returns. The head's weight is replicated on every tensor-parallel rank, so a checkpoint of it
loads at any TP size.

A response token's value is read at the position that predicts the token, like its log-prob
(`train_step.score_values`): the value at position t-1 estimates the return of the state in
which token t is generated.

The critic has its own Adam and schedule (`critic_lr`, `critic_lr_warmup_iters`; the decay
style, weight decay and clipping are the policy's) and is saved in the `critic/` folder of
each trainer checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slime_wf.training.checkpointing import find_checkpoint, load_checkpoint, save_checkpoint
from slime_wf.training.model import build_gpt_model
from slime_wf.training.optimizer import build_optimizer, build_scheduler
from slime_wf.training.weights import load_hf_checkpoint_into

logger = logging.getLogger(__name__)

CRITIC_DIR = "critic"


def critic_args(args: Any) -> argparse.Namespace:
    """The critic's view of the trainer settings: value loss, its own learning rate and warmup."""
    ns = copy.copy(args) if isinstance(args, argparse.Namespace) else argparse.Namespace(**vars(args))
    ns.loss_type = "value_loss"
    ns.lr = float(args.critic_lr if args.critic_lr is not None else args.lr)
    ns.min_lr = min(float(args.min_lr), ns.lr)
    ns.lr_warmup_iters = int(args.critic_lr_warmup_iters)
    return ns


@dataclass
class Critic:
    """The critic's model, DDP wrapper, optimizer, schedule and settings (see the module docstring)."""

    model: Any
    ddp_model: Any
    optimizer: Any
    scheduler: Any
    args: argparse.Namespace
    step: int = 0

    @classmethod
    def build(
        cls,
        args: Any,
        hf_checkpoint_dir: str,
        params_dtype: torch.dtype,
        *,
        source: Path | None = None,
        initialize: bool = True,
    ) -> Critic:
        """A critic with the body of the HF checkpoint and a zero head, or the weights and optimizer
        state of the critic checkpoint `source`; `initialize=False` leaves the body random (the
        caller loads a checkpoint into it next)."""
        cargs = critic_args(args)
        model = build_gpt_model(hf_checkpoint_dir, params_dtype=params_dtype, value_head=True)
        if source is None and initialize:
            load_hf_checkpoint_into(model, hf_checkpoint_dir)
        ddp_model, optimizer = build_optimizer(
            model,
            lr=cargs.lr,
            min_lr=cargs.min_lr,
            weight_decay=cargs.weight_decay,
            adam_beta1=cargs.adam_beta1,
            adam_beta2=cargs.adam_beta2,
            adam_eps=cargs.adam_eps,
            clip_grad=cargs.clip_grad,
        )
        critic = cls(model, ddp_model, optimizer, build_scheduler(optimizer, cargs), cargs)
        if source is not None:
            critic.load(source)
        elif initialize:
            logger.info("critic initialized from %s with a zero value head", hf_checkpoint_dir)
        return critic

    def save(self, path: Path, rollout_id: int | None) -> None:
        save_checkpoint(
            path,
            self.ddp_model,
            self.optimizer,
            self.scheduler.state_dict(),
            {"rollout_id": rollout_id, "role": "critic"},
            step=self.step,
        )

    def load(self, path: Path) -> None:
        state = load_checkpoint(path, self.ddp_model, self.optimizer)
        if state.get("extra", {}).get("role") != "critic":
            raise ValueError(
                f"{str(path)!r} is a policy checkpoint, not a critic's (its role is not 'critic')"
            )
        self.scheduler = build_scheduler(self.optimizer, self.args)
        if state.get("scheduler_state"):
            self.scheduler.load_state_dict(state["scheduler_state"])
        self.step = int(state.get("step") or 0)
        logger.info("critic loaded from %s (step %d)", path, self.step)


def critic_source(path: str | Path | None) -> Path | None:
    """The critic checkpoint `critic_load` names: the folder itself, or the `critic/` folder of a
    trainer checkpoint (or of the latest one in a folder of checkpoints); None when unset."""
    if not path:
        return None
    root = Path(path)
    if (root / "trainer_state.json").is_file() and not (root / CRITIC_DIR).is_dir():
        return root
    found = find_checkpoint(root)
    if found is None or not (found / CRITIC_DIR / "trainer_state.json").is_file():
        raise FileNotFoundError(
            f"critic_load={str(path)!r} holds no critic checkpoint (a trainer checkpoint with a {CRITIC_DIR}/ "
            "folder, written by a ppo campaign, or that folder itself)"
        )
    return found / CRITIC_DIR


__all__ = ["CRITIC_DIR", "Critic", "critic_args", "critic_source"]
