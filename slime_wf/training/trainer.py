"""The trainer: a Megatron policy (and its frozen reference) built from an HF checkpoint, with
its optimizer and schedule, trained one rollout at a time.

    trainer = Trainer(cfg.args(), "checkpoints/qwen3-0.6b")
    metrics = trainer.train(samples, rollout_id=0)
    trainer.save("runs/c/checkpoints/000000", rollout_id=0)
    trainer.export_hf("runs/c/weights/000000")     # for the engines
    trainer.shutdown()

Every rank of a torchrun world builds one (`service.py` runs it there); every method is a
collective and must be called on every rank with the same arguments.

Where the weights come from follows slime (`resolve_initial_weights`): a trainer checkpoint in
`load` is resumed (model, optimizer, schedule, step); else the weights come from `load` when it is
an HF directory, else from `ref_load`, else from the HF checkpoint (dequantized, which is lossy,
when that is an FP8 rollout checkpoint). The reference model, built only when a KL term needs it,
comes from `ref_load`, else from the same initial weights. With
`advantage_estimator: ppo` the trainer also owns a critic (`critic.py`): from the `critic/`
folder of the checkpoint it resumes from, else from `critic_load`, else the HF checkpoint's body
with a zero value head; `save` writes it into the checkpoint's `critic/` folder.

Optimizer steps skipped for non-finite values (`train_step`) are counted across rollouts; the
count is saved with each checkpoint, so that a campaign resumed from one does not start it
afresh, and `max_consecutive_skipped_steps` skips in a row raise `NonFiniteTrainingError`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from slime_wf.checkpoint.dtypes import torch_dtype
from slime_wf.checkpoint.layout import hf_quantization_config, is_hf_checkpoint, refuse_megatron_checkpoint
from slime_wf.heap import keep_freed_memory, trim_if_grown
from slime_wf.training import cpu_shim
from slime_wf.training.batching import items_from_samples
from slime_wf.training.checkpointing import (
    find_checkpoint,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
)
from slime_wf.training.critic import CRITIC_DIR, Critic, critic_source
from slime_wf.training.model import build_gpt_model, check_tp_size, describe_hf_config
from slime_wf.training.nonfinite import NonFiniteTrainingError
from slime_wf.training.objectives import ObjectiveOptions
from slime_wf.training.optimizer import build_optimizer, build_scheduler
from slime_wf.training.parallel import destroy_parallel, init_parallel
from slime_wf.training.train_args import needs_critic, needs_reference_model, params_dtype, resolve_train_args
from slime_wf.training.train_step import DataParallel, train_rollout
from slime_wf.training.weights import iter_hf_weights, load_hf_checkpoint_into, save_hf_checkpoint
from slime_wf.types import Sample

if TYPE_CHECKING:
    from slime_wf.weight_sync.distributed import WeightBroadcaster

logger = logging.getLogger(__name__)


def _local_path(path: str | os.PathLike, what: str) -> Path:
    if "://" in str(path):
        raise ValueError(
            f"{what} {str(path)!r}: trainer checkpoints and exports are written by every rank to a local (or shared) "
            "filesystem path; copy them to object storage afterwards"
        )
    return Path(path)


@dataclasses.dataclass(frozen=True)
class InitialWeights:
    """Where a model's first weights come from: `kind` is "trainer" (a trainer checkpoint's model),
    "hf" or "hf_fp8" (an HF checkpoint; an FP8 one is dequantized, which is lossy), found through
    the setting `origin` (load, ref_load or hf_checkpoint)."""

    kind: str
    path: str
    origin: str

    @property
    def lossy(self) -> bool:
        return self.kind == "hf_fp8"

    def describe(self) -> str:
        what = {
            "trainer": "trainer checkpoint",
            "hf": "HF checkpoint",
            "hf_fp8": "dequantized FP8 checkpoint",
        }
        return f"{what[self.kind]} {self.path} (from {self.origin})"


def _hf_weights(path: str | os.PathLike, origin: str) -> InitialWeights:
    return InitialWeights("hf_fp8" if hf_quantization_config(path) else "hf", str(path), origin)


def weights_source(ref_load: str | None, hf_checkpoint: str | os.PathLike) -> InitialWeights:
    """`ref_load` (a trainer checkpoint, or the latest under that folder, else an HF directory), else `hf_checkpoint`."""
    if not ref_load:
        return _hf_weights(hf_checkpoint, "hf_checkpoint")
    refuse_megatron_checkpoint(ref_load, "ref_load")
    checkpoint = find_checkpoint(ref_load)
    if checkpoint is not None:
        return InitialWeights("trainer", str(checkpoint), "ref_load")
    if is_hf_checkpoint(ref_load):
        return _hf_weights(ref_load, "ref_load")
    state = "does not exist" if not os.path.exists(ref_load) else "holds neither"
    raise FileNotFoundError(
        f"ref_load={ref_load!r} {state} a trainer checkpoint (trainer_state.json, here or in a folder below) nor an "
        "HF checkpoint directory (config.json and *.safetensors): set it to the BF16 HF checkpoint of the policy"
    )


def resolve_initial_weights(
    load: str | None, ref_load: str | None, hf_checkpoint: str | os.PathLike
) -> tuple[Path | None, InitialWeights]:
    """slime's rules (`slime_validate_args`), the first that applies:

    1. `load` holds a trainer checkpoint (or a folder of them): resume from the latest;
    2. `load` is an HF checkpoint directory: start from it;
    3. `ref_load`: a trainer checkpoint's model, or an HF directory;
    4. `hf_checkpoint`, dequantized when it is FP8 (lossy: FP8's rounding stays in the weights).

    Returns (the checkpoint to resume or None, the initial weights). When resuming, the initial
    weights are those the checkpoint records (what its campaign started from), else rules 3-4:
    the reference model's default. Megatron-LM torch_dist checkpoints are refused with CheckpointError.
    """
    refuse_megatron_checkpoint(load, "load")
    resume = find_checkpoint(load)
    if resume is not None:
        recorded = read_trainer_state(resume).get("extra", {}).get("initial_weights")
        if recorded and os.path.exists(recorded.get("path", "")):
            return resume, InitialWeights(**recorded)
        return resume, weights_source(ref_load, hf_checkpoint)
    if load and is_hf_checkpoint(load):
        return None, _hf_weights(load, "load")
    if load:
        logger.info(
            "load=%s holds no checkpoint: the initial weights come from %s",
            load,
            "ref_load" if ref_load else "hf_checkpoint",
        )
    return None, weights_source(ref_load, hf_checkpoint)


def load_weights_into(model, source: InitialWeights) -> None:
    """Copy `source`'s weights into a model built by `build_gpt_model` (no optimizer state)."""
    if source.kind == "trainer":
        load_checkpoint(source.path, model, restore_rng=False)
    else:
        describe_hf_config(source.path)
        load_hf_checkpoint_into(model, source.path)


class Trainer:
    """See the module docstring. `args`: a campaign's `cfg.args()` or any partial namespace/dict
    (completed by `resolve_train_args`)."""

    _weight_broadcaster: WeightBroadcaster | None = None  # rank 0's end of the weight-update group, once used

    def __init__(self, args: Any, hf_checkpoint_dir: str | os.PathLike):
        self.args = resolve_train_args(args)
        self.objective = ObjectiveOptions.from_args(self.args)  # resolved once, for every loss and advantage
        self.hf_checkpoint_dir = str(hf_checkpoint_dir)
        tp = self.args.tensor_model_parallel_size
        check_tp_size(describe_hf_config(self.hf_checkpoint_dir), tp)  # before any process group exists
        self.dtype = params_dtype(self.args)
        cpu_shim.check_trainable(self.dtype, use_distributed_optimizer=False)
        if cpu_shim.is_active():
            keep_freed_memory()  # a step reuses the pages of the step before (slime_wf.heap)
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
        resume, self.initial_weights = resolve_initial_weights(
            args.load, args.ref_load, self.hf_checkpoint_dir
        )
        if self.initial_weights.lossy:
            logger.warning(
                "the policy %s the dequantized weights of the FP8 checkpoint %s: lossy, FP8's rounding error stays in "
                "the trained weights (metric init_from_dequantized_fp8). Set ref_load to the BF16 HF checkpoint to "
                "train from the original weights",
                "resumes a campaign that started from" if resume else "starts from",
                self.initial_weights.path,
            )
        self.actor = build_gpt_model(self.hf_checkpoint_dir, params_dtype=self.dtype)
        if resume is None:
            load_weights_into(self.actor, self.initial_weights)
            logger.info("initial weights: %s", self.initial_weights.describe())
        self.ref = self._build_reference() if needs_reference_model(args) else None
        self.ddp_model, self.optimizer = build_optimizer(
            self.actor,
            lr=args.lr,
            min_lr=args.min_lr,
            weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1,
            adam_beta2=args.adam_beta2,
            adam_eps=args.adam_eps,
            clip_grad=args.clip_grad,
        )
        self.scheduler = build_scheduler(self.optimizer, args)
        self.critic = None
        if needs_critic(args):
            # a checkpoint to resume from that has a critic gives its weights in load() below
            resumes = resume is not None and (resume / CRITIC_DIR).is_dir()
            self.critic = Critic.build(
                args,
                self.hf_checkpoint_dir,
                self.dtype,
                initialize=not resumes,
                source=None if resumes else critic_source(args.critic_load),
            )
        self.dp = DataParallel(
            rank=self.info.dp_rank,
            size=self.info.dp_size,
            group=parallel_state.get_data_parallel_group() if self.info.dp_size > 1 else None,
        )
        self.step = 0
        self.rollout_id: int | None = None
        self.consecutive_skipped_steps = 0  # optimizer steps skipped in a row for non-finite values
        if resume is not None:
            self.load(resume)

    def _build_reference(self):
        source = (
            weights_source(self.args.ref_load, self.hf_checkpoint_dir)
            if self.args.ref_load
            else self.initial_weights
        )
        ref = build_gpt_model(self.hf_checkpoint_dir, params_dtype=self.dtype)
        load_weights_into(ref, source)
        ref.eval()
        ref.requires_grad_(False)
        logger.info("reference model: %s", source.describe())
        return ref

    # ---- the work -------------------------------------------------------------------------

    def _check_alive(self) -> None:
        if not self._alive:
            raise RuntimeError("this Trainer was shut down; build a new one")

    def train(self, samples: list[Sample | dict], rollout_id: int) -> dict[str, Any]:
        """Train on one rollout's samples (in group order); returns the rollout's metrics."""
        self._check_alive()
        rollout = [s if isinstance(s, Sample) else Sample.from_dict(s) for s in samples]
        items = items_from_samples(rollout, self.args)
        # slime's num_critic_only_steps: the first rollouts train the critic alone
        train_actor = self.critic is None or int(rollout_id) >= self.args.num_critic_only_steps
        try:
            metrics = train_rollout(
                ddp_model=self.ddp_model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                ref_model=self.ref,
                items=items,
                args=self.args,
                dp=self.dp,
                device=self.info.device,
                critic=self.critic,
                train_actor=train_actor,
                rollout_id=int(rollout_id),
                consecutive_skipped_steps=self.consecutive_skipped_steps,
                objective=self.objective,
            )
        except NonFiniteTrainingError as err:
            self.step += err.applied_steps
            self.consecutive_skipped_steps = err.consecutive
            raise
        trim_if_grown()  # bounds the heap that keep_freed_memory keeps (slime_wf.heap)
        self.step += int(metrics["applied_steps"])
        self.consecutive_skipped_steps = int(metrics["consecutive_skipped_steps"])
        self.rollout_id = int(rollout_id)
        metrics.update(rollout_id=self.rollout_id, step=self.step)
        if self.initial_weights.lossy:
            metrics["init_from_dequantized_fp8"] = 1.0
        logger.info(
            "rollout %d trained: %d steps, loss %.4g, %.0f tokens/s",
            rollout_id,
            metrics["num_steps"],
            metrics.get("loss", float("nan")),
            metrics["tokens_per_s"],
        )
        return metrics

    def save(self, path: str | os.PathLike, rollout_id: int | None = None) -> str:
        """Checkpoint the model, optimizer, schedule, RNG states and step to `path` (replaced if present)."""
        self._check_alive()
        rollout_id = self.rollout_id if rollout_id is None else int(rollout_id)
        save_checkpoint(
            _local_path(path, "save path"),
            self.ddp_model,
            self.optimizer,
            self.scheduler.state_dict(),
            {
                "rollout_id": rollout_id,
                "hf_checkpoint": self.hf_checkpoint_dir,
                "initial_weights": dataclasses.asdict(self.initial_weights),
                "consecutive_skipped_steps": self.consecutive_skipped_steps,
            },
            step=self.step,
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
        self.consecutive_skipped_steps = int(state.get("extra", {}).get("consecutive_skipped_steps") or 0)
        if self.critic is not None:
            if (found / CRITIC_DIR).is_dir():
                self.critic.load(found / CRITIC_DIR)
            else:
                logger.warning(
                    "checkpoint %s has no critic (saved without ppo): the critic keeps its current weights",
                    found,
                )
        logger.info("resumed from %s (rollout %s, step %d)", found, self.rollout_id, self.step)
        return {"path": str(found), "rollout_id": self.rollout_id, "step": self.step}

    def export_hf(self, out_dir: str | os.PathLike, dtype: torch.dtype | str | None = None) -> str:
        """Write the current weights as an HF checkpoint (rank 0 writes; config, generation config and
        tokenizer copied from the HF checkpoint). `dtype`: the model's when None."""
        self._check_alive()
        out_dir = _local_path(out_dir, "export directory")
        if isinstance(dtype, str):
            dtype = torch_dtype(dtype, "export dtype")
        rank = dist.get_rank()
        weights = {}
        for name, tensor in iter_hf_weights(self.ddp_model, dtype):
            if rank == 0:
                weights[name] = tensor
        if rank == 0:
            save_hf_checkpoint(weights, self.hf_checkpoint_dir, out_dir)
        dist.barrier()
        return str(out_dir)

    def broadcast_weights(self, plan: dict[str, Any], request: dict[str, Any]) -> dict[str, float]:
        """The `distributed` weight sync (`slime_wf.weight_sync.distributed`): every rank gathers its
        tensor-parallel shards in step, and rank 0 sends the weights to the engines of `plan` over their
        weight-update group (built on first use of the plan's group name). Metrics on rank 0."""
        self._check_alive()
        weights = iter_hf_weights(self.ddp_model)
        if dist.get_rank() != 0:
            for _ in weights:
                pass
            return {}
        if self._weight_broadcaster is None:
            from slime_wf.weight_sync.distributed import WeightBroadcaster

            self._weight_broadcaster = WeightBroadcaster()
        return self._weight_broadcaster.send(plan, request, weights)

    def close_weight_group(self) -> None:
        """Destroy rank 0's weight-update group, on the engines too (best effort)."""
        if self._weight_broadcaster is not None:
            self._weight_broadcaster.close()

    def shutdown(self) -> None:
        """Free the models and tear the parallel state down (safe to call twice)."""
        if not getattr(self, "_alive", False):
            return
        self._alive = False
        if self._weight_broadcaster is not None:
            self._weight_broadcaster.shutdown()
            self._weight_broadcaster = None
        for name in ("ddp_model", "optimizer", "scheduler", "actor", "ref", "critic"):
            if hasattr(self, name):
                setattr(self, name, None)
        destroy_parallel()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
