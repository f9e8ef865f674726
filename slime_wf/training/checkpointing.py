"""Distributed checkpoints of the Megatron model and optimizer, resharding across TP sizes.

Layout of a checkpoint directory:

    megatron/            megatron.core.dist_checkpointing of {"model": ..., "optimizer": ...}
    trainer_state.json   step, scheduler state, caller's extra dict, the saving layout
    rng/rank<r>.pt       each rank's RNG states (python, numpy, torch, device, Megatron tracker)

The model (and the optimizer's Adam moments, which Megatron shards like their parameters)
load at any tensor-parallel size. RNG states are restored only when the layout matches: a
rank's random streams have no meaning in another layout.

Every rank must see the same filesystem path (one node, or a shared filesystem); `s3://`
is not supported here. A checkpoint is written to a temporary sibling directory and renamed
into place, so a crash leaves the previous checkpoint (or none), never half of one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from slime_wf.training import cpu_shim
from slime_wf.training.model import unwrap_model

logger = logging.getLogger(__name__)

FORMAT = "slime-wf-megatron-checkpoint/1"
_MEGATRON_DIR = "megatron"
_STATE_FILE = "trainer_state.json"


def _prepare_writer_queue() -> None:
    """Give dist_checkpointing an in-process result queue before its first save.

    Megatron otherwise creates it with a *spawn*-started `multiprocessing.Manager`, whose child
    re-imports the parent's `__main__` module: a script without an `if __name__ == "__main__":`
    guard would run again inside it (under torchrun, trying to join the process group a
    second time), and the manager process outlives the save. The queue only carries write
    results from the saving thread to itself when saves are synchronous, as they are here, so
    a plain `queue.Queue` does the job with no extra process. (An asynchronous save would
    need a picklable queue; save_checkpoint never starts one.)
    """
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _same_on_all_ranks(value: str) -> str:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "device": cpu_shim.device_rng_state(),
        "megatron_tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cpu_shim.set_device_rng_state(state["device"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["megatron_tracker"])


def _layout() -> dict:
    from megatron.core import parallel_state

    return {
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "tp_size": parallel_state.get_tensor_model_parallel_world_size(),
    }


def save_checkpoint(
    path: str | os.PathLike,
    model,
    optimizer=None,
    scheduler_state: dict | None = None,
    extra: dict | None = None,
    *,
    step: int | None = None,
) -> Path:
    """Save model (+ optimizer) shards, RNG states and a JSON sidecar to `path` (a collective).

    `scheduler_state` and `extra` must be JSON-serializable. An existing checkpoint at `path`
    is replaced.
    """
    from megatron.core import dist_checkpointing

    path = Path(path)
    sidecar = {
        "format": FORMAT,
        "step": step,
        "scheduler_state": scheduler_state,
        "extra": extra or {},
        "has_optimizer": optimizer is not None,
        **_layout(),
    }
    try:
        sidecar_text = json.dumps(sidecar, indent=1)
    except TypeError as err:
        raise TypeError(f"save_checkpoint: scheduler_state and extra must be JSON-serializable ({err})") from None

    tmp = path.with_name(_same_on_all_ranks(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"))
    if _rank() == 0:
        (tmp / _MEGATRON_DIR).mkdir(parents=True)
        (tmp / "rng").mkdir()
    _barrier()
    _prepare_writer_queue()
    gpt = unwrap_model(model)
    sharded = {"model": gpt.sharded_state_dict()}
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded)
    dist_checkpointing.save(sharded, str(tmp / _MEGATRON_DIR))
    torch.save(_rng_state(), tmp / "rng" / f"rank{_rank():05d}.pt")
    _barrier()
    if _rank() == 0:
        (tmp / _STATE_FILE).write_text(sidecar_text)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old)
    _barrier()
    logger.info("saved checkpoint %s (step %s)", path, step)
    return path


def read_trainer_state(path: str | os.PathLike) -> dict:
    """The JSON sidecar of a checkpoint (no collective, no model needed)."""
    state_file = Path(path) / _STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a slime-wf checkpoint (no {_STATE_FILE})")
    state = json.loads(state_file.read_text())
    if state.get("format") != FORMAT:
        raise ValueError(f"checkpoint {str(path)!r} has format {state.get('format')!r}, expected {FORMAT!r}")
    return state


def load_checkpoint(path: str | os.PathLike, model, optimizer=None, *, restore_rng: bool = True) -> dict[str, Any]:
    """Load a checkpoint saved by `save_checkpoint` into `model` (+ `optimizer`); a collective.

    Works at any tensor-parallel size. Returns the sidecar: `step`, `scheduler_state`,
    `extra`, and `rng_restored` (False when the saving layout differs from this one).
    """
    from megatron.core import dist_checkpointing

    path = Path(path)
    state = read_trainer_state(path)
    if optimizer is not None and not state["has_optimizer"]:
        raise ValueError(f"checkpoint {str(path)!r} has no optimizer state; load it without an optimizer")
    gpt = unwrap_model(model)
    sharded = {"model": gpt.sharded_state_dict()}
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=True)
    loaded = dist_checkpointing.load(sharded, str(path / _MEGATRON_DIR))
    gpt.load_state_dict(loaded["model"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])

    rng_file = path / "rng" / f"rank{_rank():05d}.pt"
    state["rng_restored"] = False
    same_layout = all(state.get(k) == v for k, v in _layout().items())
    if restore_rng and same_layout and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
        state["rng_restored"] = True
    elif restore_rng:
        logger.info("checkpoint %s was saved with layout %s; RNG states not restored", path,
                    {k: state.get(k) for k in _layout()})
    _barrier()
    return state
