"""The campaign's trainer: built from the committed checkpoint, rebuilt from it after a fault.

The trainer client (`training.trainer_client`: in this process for a world of one, else a torchrun
group of `train.actor_num_nodes` x `actor_num_gpus_per_node`) always starts from what the run store
commits: the checkpoint that `manifest.json` names, else the config's `load` / `ref_load` /
hf_checkpoint. It trains on the samples a rollout id stored, and saves its checkpoints into the store.

A fault while training (a rank died, the group or a command failed) leaves the trainer's state
unknown: a failed step may have half-applied an optimizer update. So `train_with_recovery` rebuilds
the whole trainer from the committed checkpoint, trains the rollout ids since that checkpoint again
from their stored samples, then the failed one. Non-finite training is no fault (the same samples
would fail the same way) and is raised at once.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from slime_wf.store import RunStore
from slime_wf.types import Sample

if TYPE_CHECKING:
    from slime_wf.training.trainer_client import TrainerClient

logger = logging.getLogger(__name__)


def build_trainer(
    args: argparse.Namespace,
    store: RunStore,
    checkpoint: str | None,
    *,
    work_dir: str,
    log_dir: str,
    this_node_only: bool = False,
) -> TrainerClient:
    """A trainer from the store's `checkpoint` (or from `args.load` / hf_checkpoint when None), with its
    files in `work_dir` and its log in `log_dir`/trainer.log. `args` is the campaign's one namespace,
    with `hf_checkpoint` already resolved to a local folder; it is not changed: the trainer gets a copy
    with `load` set to the checkpoint. From an s3:// store the checkpoint is downloaded to `restore/`
    beside `work_dir`, and that copy is removed once the trainer has read it (it reads everything
    while it is built). `this_node_only` (an export for the evaluate flow, which may run beside train)
    keeps the group on this node."""
    from slime_wf.training.trainer_client import make_trainer
    from slime_wf.training.trainer_group import threads_per_rank

    assert os.path.isdir(args.hf_checkpoint), (
        "Campaign.prepare() resolves hf_checkpoint to a local folder first"
    )
    settings = dict(vars(args))
    if this_node_only and args.actor_num_nodes > 1:  # a checkpoint loads at any TP size
        settings["actor_num_nodes"] = 1
        settings["tensor_model_parallel_size"] = math.gcd(
            args.tensor_model_parallel_size, args.actor_num_gpus_per_node
        )
    local_copy = None
    if checkpoint:
        if store.is_local:
            settings["load"] = store.local_path(checkpoint)
        else:
            local_copy = os.path.join(os.path.dirname(work_dir), "restore", os.path.basename(checkpoint))
            settings["load"] = store.get_dir(checkpoint, local_copy)
    ranks = args.actor_num_gpus_per_node
    beside_engines = trainer_cpu_threads(args)
    try:
        return make_trainer(
            settings,
            args.hf_checkpoint,
            work_dir=work_dir,
            log_path=os.path.join(log_dir, "trainer.log"),
            threads_per_rank=threads_per_rank(ranks)
            if beside_engines is None
            else max(1, beside_engines // ranks),
            local_threads=beside_engines,
        )
    finally:
        if local_copy is not None:
            shutil.rmtree(local_copy, ignore_errors=True)


def trainer_cpu_threads(args: argparse.Namespace) -> int | None:
    """The trainer's torch threads on this node under `rollout.train_async` with local engines and no GPU:
    the cores the engines leave (`local_engine_threads`), since rollout and training then compute at the
    same time. None otherwise (the trainer's own default)."""
    if not args.train_async or args.engine_type != "local":
        return None
    import torch

    if torch.cuda.is_available():
        return None
    from slime_wf.rollout.engines import local_engine_threads

    return max(1, (os.cpu_count() or 1) - local_engine_threads(args) * args.num_engines)


class CampaignTrainer:
    """The trainer client of one campaign (`client`: None until `start`), and how it is rebuilt."""

    def __init__(self, args: argparse.Namespace, store: RunStore, scratch: str):
        self.args, self.store, self.scratch = args, store, scratch
        self.client: TrainerClient | None = None

    def _committed(self) -> tuple[int | None, str | None]:
        """(last committed rollout id, its checkpoint in the store) as the manifest names them."""
        manifest = self.store.read_manifest() or {}
        last = manifest.get("last_completed_rollout_id")
        return (None if last is None else int(last)), manifest.get("last_checkpoint")

    def start(self) -> TrainerClient:
        """(Re)build the trainer from the committed checkpoint; a running one is shut down first."""
        self.shutdown()
        self.client = build_trainer(
            self.args,
            self.store,
            self._committed()[1],
            work_dir=os.path.join(self.scratch, "trainer"),
            log_dir=os.path.join(self.scratch, "logs"),
        )
        return self.client

    def started(self) -> TrainerClient:
        """The trainer client; raises when it is not started."""
        if self.client is None:
            raise RuntimeError(
                f"campaign {self.args.campaign}: the trainer is not started: call start() first"
            )
        return self.client

    def train(self, rid: int) -> dict[str, Any]:
        """One training step on rollout `rid`'s stored samples."""
        rows = self.store.read_jsonl(RunStore.rollout_file(rid, "samples.jsonl"))
        return self.started().train([Sample.from_dict(r) for r in rows], rid)

    def can_restart_for(self, rid: int) -> list[int] | None:
        """The rollout ids to train again, in order, on a trainer rebuilt from the committed checkpoint before
        `rid` is trained once more; None when a rebuild cannot restore the state: a stored rollout since the
        checkpoint lacks its samples, or nothing is committed and the trainer started from a `load` setting."""
        last, _ = self._committed()
        replay = list(range(0 if last is None else last + 1, rid))
        if last is None and self.args.load:
            return None
        if not all(self.store.exists(RunStore.rollout_file(i, "samples.jsonl")) for i in replay):
            return None
        return replay

    def train_with_recovery(self, rid: int, warn: Callable[..., None] = logger.warning) -> dict[str, Any]:
        """`train`, and after a trainer fault once more on a trainer rebuilt from the committed checkpoint,
        after the rollout ids trained since that checkpoint (see the module docstring)."""
        from slime_wf.training.nonfinite import NonFiniteTrainingError

        try:
            return self.train(rid)
        except NonFiniteTrainingError:
            raise
        except Exception as err:
            replay = self.can_restart_for(rid)
            if replay is None:
                raise
            warn(
                "training rollout %d failed (%s: %s); restarting the trainer from the committed checkpoint (rollout "
                "%s) and training %s again",
                rid,
                type(err).__name__,
                str(err).splitlines()[0] if str(err) else "",
                self._committed()[0],
                ", ".join(map(str, [*replay, rid])),
            )
        self.start()
        for earlier in replay:
            self.train(earlier)
        return self.train(rid)

    def save(self, rid: int) -> str:
        """Save the trainer's checkpoint of `rid` into the store; returns its folder relative to the store."""
        trainer, rel = self.started(), RunStore.checkpoint_dir(rid)
        if self.store.is_local:
            trainer.save(self.store.local_path(rel), rid)
            return rel
        local = os.path.join(self.scratch, "checkpoints", f"{rid:06d}")
        try:
            trainer.save(local, rid)
            self.store.put_dir(local, rel)
        finally:  # the store holds the checkpoint; scratch keeps no copy of it, uploaded or not
            shutil.rmtree(local, ignore_errors=True)
        return rel

    def shutdown(self) -> None:
        if self.client is not None:
            self.client.shutdown()
            self.client = None
