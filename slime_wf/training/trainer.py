"""The trainer: a Megatron policy (and its frozen reference) built from an HF checkpoint, with
its optimizer and schedule, trained one rollout at a time.

    trainer = Trainer(cfg.args(), "checkpoints/qwen3-0.6b")
    metrics = trainer.train(samples, rollout_id=0)
    trainer.save("runs/c/checkpoints/000000", rollout_id=0)
    trainer.export_hf("runs/c/weights/000000")     # for the engines
    trainer.shutdown()

Every rank of a torchrun world builds one (`service.py` runs it there); every method is a
collective and must be called on every rank with the same arguments.

Where the weights come from (slime's semantics): from `load` when it holds a checkpoint (the
checkpoint itself, or the latest under that folder: model, optimizer, schedule, step); else
from the HF checkpoint. The reference model, built only when a KL term needs it, comes from
`ref_load` (an HF directory or a trainer checkpoint) or else the same HF checkpoint. With
`advantage_estimator: ppo` the trainer also owns a critic (`critic.py`): from the `critic/`
folder of the checkpoint it resumes from, else from `critic_load`, else the HF checkpoint's body
with a zero value head; `save` writes it into the checkpoint's `critic/` folder.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from slime_wf.training import cpu_shim
from slime_wf.training.batching import items_from_samples
from slime_wf.training.checkpointing import load_checkpoint, read_trainer_state, save_checkpoint
from slime_wf.training.critic import CRITIC_DIR, Critic, critic_source, needs_critic
from slime_wf.training.model import build_gpt_model, check_tp_size, describe_hf_config
from slime_wf.training.optimizer import build_optimizer
from slime_wf.training.parallel import destroy_parallel, init_parallel
from slime_wf.training.train_args import needs_reference_model, params_dtype, resolve_train_args
from slime_wf.training.train_step import DataParallel, build_scheduler, train_rollout
from slime_wf.training.weights import iter_hf_weights, load_hf_checkpoint_into, save_hf_checkpoint
from slime_wf.types import Sample

logger = logging.getLogger(__name__)


def _local_path(path: str | os.PathLike, what: str) -> Path:
    if "://" in str(path):
        raise ValueError(
            f"{what} {str(path)!r}: trainer checkpoints and exports are written by every rank to a local (or shared) "
            "filesystem path; copy them to object storage afterwards"
        )
    return Path(path)


def find_checkpoint(path: str | os.PathLike | None) -> Path | None:
    """The trainer checkpoint at `path`, or the latest one in the folder `path` (by rollout id,
    then step), or None when there is none (a missing folder included)."""
    if not path:
        return None
    root = Path(path)
    if (root / "trainer_state.json").is_file():
        return root
    if not root.is_dir():
        return None
    found = []
    for child in root.iterdir():
        if child.is_dir() and not child.name.startswith(".") and (child / "trainer_state.json").is_file():
            state = read_trainer_state(child)
            rollout_id = state.get("extra", {}).get("rollout_id")
            found.append((-1 if rollout_id is None else int(rollout_id), state.get("step") or 0, child.name, child))
    return max(found)[-1] if found else None


class Trainer:
    """See the module docstring. `args`: a campaign's `cfg.args()` or any partial namespace/dict
    (completed by `resolve_train_args`)."""

    def __init__(self, args: Any, hf_checkpoint_dir: str | os.PathLike):
        self.args = resolve_train_args(args)
        self.hf_checkpoint_dir = str(hf_checkpoint_dir)
        tp = self.args.tensor_model_parallel_size
        check_tp_size(describe_hf_config(self.hf_checkpoint_dir), tp)  # before any process group exists
        self.dtype = params_dtype(self.args)
        cpu_shim.check_trainable(self.dtype, use_distributed_optimizer=False)
        try:
            self.info = init_parallel(tp, seed=self.args.seed)
        except BaseException:
            destroy_parallel()
            raise
        self._alive = True
        try:
            self._build()
        except BaseException:
            self.shutdown()
            raise

    def _build(self) -> None:
        from megatron.core import parallel_state

        args = self.args
        resume = find_checkpoint(args.load)
        if args.load and resume is None:
            logger.info("load=%s holds no checkpoint: starting from %s", args.load, self.hf_checkpoint_dir)
        self.actor = build_gpt_model(self.hf_checkpoint_dir, params_dtype=self.dtype)
        if resume is None:
            load_hf_checkpoint_into(self.actor, self.hf_checkpoint_dir)
        self.ref = self._build_reference() if needs_reference_model(args) else None
        self.ddp_model, self.optimizer = build_optimizer(
            self.actor, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay, adam_beta1=args.adam_beta1,
            adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, clip_grad=args.clip_grad,
        )
        self.scheduler = build_scheduler(self.optimizer, args)
        self.critic = None
        if needs_critic(args):
            # a checkpoint to resume from that has a critic gives its weights in load() below
            resumes = resume is not None and (resume / CRITIC_DIR).is_dir()
            self.critic = Critic.build(args, self.hf_checkpoint_dir, self.dtype, initialize=not resumes,
                                       source=None if resumes else critic_source(args.critic_load))
        self.dp = DataParallel(
            rank=self.info.dp_rank, size=self.info.dp_size,
            group=parallel_state.get_data_parallel_group() if self.info.dp_size > 1 else None,
        )
        self.step = 0
        self.rollout_id: int | None = None
        if resume is not None:
            self.load(resume)

    def _build_reference(self):
        source = self.args.ref_load or self.hf_checkpoint_dir
        ref = build_gpt_model(self.hf_checkpoint_dir, params_dtype=self.dtype)
        if (Path(source) / "trainer_state.json").is_file():
            load_checkpoint(source, ref, restore_rng=False)
        elif (Path(source) / "config.json").is_file():
            describe_hf_config(source)
            load_hf_checkpoint_into(ref, source)
        else:
            raise FileNotFoundError(
                f"ref_load={source!r} is neither an HF checkpoint (config.json) nor a trainer checkpoint "
                "(trainer_state.json)"
            )
        ref.eval()
        ref.requires_grad_(False)
        logger.info("reference model loaded from %s", source)
        return ref

    # ---- the work -------------------------------------------------------------------------

    def _check_alive(self) -> None:
        if not self._alive:
            raise RuntimeError("this Trainer was shut down; build a new one")

    def train(self, samples: list[Sample | dict], rollout_id: int) -> dict[str, Any]:
        """Train on one rollout's samples (in group order); returns the rollout's metrics."""
        self._check_alive()
        samples = [s if isinstance(s, Sample) else Sample.from_dict(s) for s in samples]
        items = items_from_samples(samples, self.args)
        # slime's num_critic_only_steps: the first rollouts train the critic alone
        train_actor = self.critic is None or int(rollout_id) >= self.args.num_critic_only_steps
        metrics = train_rollout(
            ddp_model=self.ddp_model, optimizer=self.optimizer, scheduler=self.scheduler, ref_model=self.ref,
            items=items, args=self.args, dp=self.dp, device=self.info.device, critic=self.critic,
            train_actor=train_actor,
        )
        if train_actor:
            self.step += int(metrics["num_steps"])
        self.rollout_id = int(rollout_id)
        metrics.update(rollout_id=self.rollout_id, step=self.step)
        logger.info("rollout %d trained: %d steps, loss %.4g, %.0f tokens/s", rollout_id, metrics["num_steps"],
                    metrics.get("loss", float("nan")), metrics["tokens_per_s"])
        return metrics

    def save(self, path: str | os.PathLike, rollout_id: int | None = None) -> str:
        """Checkpoint the model, optimizer, schedule, RNG states and step to `path` (replaced if present)."""
        self._check_alive()
        rollout_id = self.rollout_id if rollout_id is None else int(rollout_id)
        save_checkpoint(
            _local_path(path, "save path"), self.ddp_model, self.optimizer, self.scheduler.state_dict(),
            {"rollout_id": rollout_id, "hf_checkpoint": self.hf_checkpoint_dir}, step=self.step,
        )
        if self.critic is not None:
            self.critic.save(Path(path) / CRITIC_DIR, rollout_id)
        return str(path)

    def load(self, path: str | os.PathLike) -> dict[str, Any]:
        """Resume from a checkpoint (or the latest one in the folder `path`) at any TP size."""
        self._check_alive()
        found = find_checkpoint(_local_path(path, "load path"))
        if found is None:
            raise FileNotFoundError(f"no trainer checkpoint at {str(path)!r} (nor in a folder below it)")
        state = load_checkpoint(found, self.ddp_model, self.optimizer)
        self.scheduler = build_scheduler(self.optimizer, self.args)  # fresh: load_state_dict adds the steps
        if state.get("scheduler_state"):
            self.scheduler.load_state_dict(state["scheduler_state"])
        self.step = int(state.get("step") or 0)
        self.rollout_id = state.get("extra", {}).get("rollout_id")
        if self.critic is not None:
            if (found / CRITIC_DIR).is_dir():
                self.critic.load(found / CRITIC_DIR)
            else:
                logger.warning("checkpoint %s has no critic (saved without ppo): the critic keeps its current "
                               "weights", found)
        logger.info("resumed from %s (rollout %s, step %d)", found, self.rollout_id, self.step)
        return {"path": str(found), "rollout_id": self.rollout_id, "step": self.step}

    def export_hf(self, out_dir: str | os.PathLike, dtype: torch.dtype | str | None = None) -> str:
        """Write the current weights as an HF checkpoint (rank 0 writes; config, generation config and
        tokenizer copied from the HF checkpoint). `dtype`: the model's when None."""
        self._check_alive()
        out_dir = _local_path(out_dir, "export directory")
        if isinstance(dtype, str):
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise ValueError(f"export dtype {dtype!r} is not a torch dtype (e.g. 'bfloat16', 'float32')")
            dtype = getattr(torch, dtype)
        rank = dist.get_rank()
        weights = {}
        for name, tensor in iter_hf_weights(self.ddp_model, dtype):
            if rank == 0:
                weights[name] = tensor
        if rank == 0:
            save_hf_checkpoint(weights, self.hf_checkpoint_dir, out_dir)
        dist.barrier()
        return str(out_dir)

    def shutdown(self) -> None:
        """Free the models and tear the parallel state down (safe to call twice)."""
        if not getattr(self, "_alive", False):
            return
        self._alive = False
        for name in ("ddp_model", "optimizer", "scheduler", "actor", "ref", "critic"):
            if hasattr(self, name):
                setattr(self, name, None)
        destroy_parallel()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
