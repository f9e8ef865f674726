"""What the engines serve, and from which folder.

- `prepare_checkpoint`: the policy checkpoint resolved to a local folder, and what the engines start
  from (that checkpoint as it is, or its FP8 rollout copy).
- `weights_known_before_trainer`: what a start serves when the trainer is not needed to know it, so
  that the engines load while the trainer is built.
- `weights_from_trainer`: otherwise, the trainer's weights, exported in the served format.
- `committed_weights`: the committed policy, for the evaluate flow (a reader of the run store): the
  export the manifest names, or one rebuilt from the committed checkpoint when it is not on this machine.

Every export is cast to the layout of the checkpoint the engines started from (`Fp8Format`; None when
they serve plain weights). Before anything is committed the engines serve version "init".
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import TYPE_CHECKING, Any

from slime_wf.campaign_trainer import build_trainer
from slime_wf.store import RunStore

if TYPE_CHECKING:
    from slime_wf.checkpoint.fp8_format import Fp8Format
    from slime_wf.config import CampaignConfig
    from slime_wf.training.trainer_client import TrainerClient

logger = logging.getLogger(__name__)

INITIAL_WEIGHT_VERSION = "init"


def prepare_checkpoint(cfg: CampaignConfig, *, progress: bool = True) -> dict[str, str]:
    """Resolve the policy checkpoint to a local folder and decide what the engines serve.

    An FP8 hf_checkpoint (slime's recipe: a published FP8 checkpoint for rollout, the BF16 weights in
    ref_load / load for training) is served as it is. A BF16 one is served as it is, or with
    `rollout_fp8` as an FP8 copy made here. Returns `hf_dir` (tokenizer and config), `rollout_dir`
    (what the engines start from) and `rollout_format`. The trainer's weight settings are checked
    first, so that a setting it would refuse fails before anything is downloaded.
    """
    from slime_wf.checkpoint import CheckpointError
    from slime_wf.checkpoint.download import resolve_checkpoint
    from slime_wf.checkpoint.fp8_format import Fp8Format
    from slime_wf.checkpoint.layout import refuse_megatron_checkpoint

    m = cfg.model
    if not m.hf_checkpoint:
        raise ValueError(
            "model.hf_checkpoint is not set: name a local folder, a hub repo id or s3://bucket/prefix"
        )
    for what, path in (("checkpoint.load", cfg.checkpoint.load), ("train.ref_load", cfg.train.ref_load)):
        refuse_megatron_checkpoint(path, what)
    if cfg.train.ref_load and not os.path.exists(cfg.train.ref_load):
        raise CheckpointError(
            f"train.ref_load={cfg.train.ref_load!r} does not exist (relative paths are read from {os.getcwd()}): set it "
            "to the policy's BF16 HF checkpoint directory or to a trainer checkpoint"
        )
    hf_dir = resolve_checkpoint(m.hf_checkpoint, m.cache_dir, revision=m.hf_revision, progress=progress)
    served = Fp8Format.of_checkpoint(hf_dir)
    rollout_dir = hf_dir
    if served is not None:
        own = (m.fp8_strategy, tuple(m.fp8_block_size) if m.fp8_strategy == "block" else None)
        if m.rollout_fp8 and own != (served.strategy, served.block_size):
            logger.warning(
                "model.hf_checkpoint %s is FP8 already: it is served as it is, in its own format (%s); "
                "rollout_fp8's fp8_strategy / fp8_block_size are not used",
                hf_dir,
                served.describe(),
            )
    elif m.rollout_fp8:
        from slime_wf.checkpoint.fp8_convert import convert_checkpoint

        name = os.path.basename(os.path.normpath(hf_dir))
        rollout_dir = os.path.join(
            m.cache_dir, "fp8", f"{name}-{m.fp8_strategy}-{m.fp8_block_size[0]}x{m.fp8_block_size[1]}"
        )
        done = os.path.join(rollout_dir, ".complete")
        if not os.path.exists(done) or os.path.getmtime(done) < _newest_mtime(hf_dir):
            convert_checkpoint(
                hf_dir,
                rollout_dir,
                strategy=m.fp8_strategy,
                block_size=m.fp8_block_size,
                overwrite=True,
                progress=progress,
            )
            open(done, "w").close()
        served = Fp8Format.of_checkpoint(rollout_dir)
    return {
        "hf_dir": os.path.abspath(hf_dir),
        "rollout_dir": os.path.abspath(rollout_dir),
        "rollout_format": served.describe() if served is not None else "plain (not quantized)",
    }


def _newest_mtime(folder: str) -> float:
    return max((os.path.getmtime(os.path.join(folder, f)) for f in os.listdir(folder)), default=0.0)


def weights_known_before_trainer(
    args: argparse.Namespace, rollout_dir: str, manifest: dict[str, Any] | None
) -> tuple[str, str] | None:
    """(folder, version) the engines must serve, when the trainer is not needed to know it: a fresh
    campaign (`manifest` None) whose trainer starts from hf_checkpoint (served as `rollout_dir`), or a
    resume whose committed export is still in scratch. None when the trainer must export first."""
    if manifest is None:
        if args.load or args.ref_load:
            return None  # the trainer's initial weights are not the served checkpoint's
        return rollout_dir, INITIAL_WEIGHT_VERSION
    exported = manifest.get("weights") or {}
    path, version = exported.get("path"), exported.get("version")
    last = manifest.get("last_completed_rollout_id")
    if path and version == str(last) and os.path.isfile(os.path.join(path, "config.json")):
        return path, str(version)
    return None


def weights_from_trainer(
    trainer: TrainerClient,
    last: int | None,
    *,
    load: str | None,
    rollout_dir: str,
    weights_dir: str,
    fp8: Fp8Format | None,
) -> tuple[str, str]:
    """(folder, version) the engines serve when only the trainer knows it. A resume (or a start from
    `load`) serves the restored policy, exported into `weights_dir`. A fresh campaign serves its trainer's
    initial weights when they are not the served checkpoint's (slime's FP8 recipe: BF16 weights in
    ref_load, a published FP8 hf_checkpoint): exported in the served format, as slime's weight sync
    before the first rollout does, so that rollout 0 is generated by the policy that trains on it."""
    from slime_wf.weight_sync.disk import export_weights

    if last is None and not load:
        initial = trainer.initial_weights
        if initial is None or initial.origin == "hf_checkpoint":
            return rollout_dir, INITIAL_WEIGHT_VERSION
        weights = export_weights(trainer, os.path.join(weights_dir, "initial"), fp8=fp8)
        logger.info(
            "engines start from the trainer's initial weights (%s) as %s",
            initial.describe(),
            fp8.describe() if fp8 is not None else "plain weights",
        )
        return weights, INITIAL_WEIGHT_VERSION
    version = INITIAL_WEIGHT_VERSION if last is None else str(last)
    return export_weights(trainer, os.path.join(weights_dir, f"resume-{version}"), fp8=fp8), version


def committed_weights(
    args: argparse.Namespace,
    store: RunStore,
    manifest: dict[str, Any],
    *,
    rollout_dir: str,
    fp8: Fp8Format | None,
    exports_dir: str,
    log_dir: str,
) -> tuple[str, str]:
    """(folder, weight version) of the committed policy in the engines' format.

    The export named by the manifest lives in the scratch of the machine that trained. When it is
    not here (pruned, or another machine), it is rebuilt from the committed checkpoint into
    `exports_dir`, which the caller removes when done: that builds the trainer once, on this node."""
    last = manifest.get("last_completed_rollout_id")
    if last is None and not args.load:
        return rollout_dir, INITIAL_WEIGHT_VERSION
    exported = manifest.get("weights") or {}
    version = str(exported.get("version") or (INITIAL_WEIGHT_VERSION if last is None else last))
    path = exported.get("path")
    if path and os.path.isfile(os.path.join(path, "config.json")):
        return path, version
    from slime_wf.weight_sync.disk import export_weights

    checkpoint = manifest.get("last_checkpoint")
    logger.warning(
        "campaign %s: the committed policy's weight export %s is not on this machine (scratch pruned, or trained "
        "on another machine); rebuilding it from %s, which loads the trainer once. Run evaluate where the "
        "campaign trains (same storage.scratch_dir) to serve the export directly",
        args.campaign,
        path or "(none named)",
        store.url(checkpoint) if checkpoint else args.load,
    )
    trainer = build_trainer(
        args,
        store,
        checkpoint,
        work_dir=os.path.join(exports_dir, "trainer"),
        log_dir=log_dir,
        this_node_only=True,
    )
    try:
        return export_weights(trainer, os.path.join(exports_dir, version), fp8=fp8), version
    finally:
        trainer.shutdown()
