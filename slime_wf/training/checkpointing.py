"""Distributed checkpoints of the Megatron model and optimizer, resharding across TP sizes.

Layout of a checkpoint directory:

    megatron/                  megatron.core.dist_checkpointing of {"model": ..., "optimizer": ...}
    trainer_state.json         step, scheduler state, caller's extra dict, the saving layout
    rng/rank<r>.json           each rank's python and numpy RNG states
    rng/rank<r>.safetensors    each rank's torch, device and Megatron-tracker RNG states (uint8)

The model (and the optimizer's Adam moments, which Megatron shards like their parameters)
load at any tensor-parallel size. RNG states are restored only when the layout matches: a
rank's random streams have no meaning in another layout.

Every rank must see the same filesystem path (one node, or a shared filesystem); `s3://`
is not supported here. A checkpoint is written to a temporary sibling directory and renamed
into place, so a crash leaves the previous checkpoint (or none), never half of one.

Nothing is unpickled beyond plain data: the RNG states are JSON and safetensors, and the
Megatron part is loaded through `safe_load` (tensors and containers only). Checkpoints of
format 1, whose RNG files were pickles of Python objects, are refused.
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
from slime_wf.training.optimizer import use_fused_adam
from slime_wf.training.safe_load import UnsafeCheckpointError, install_weights_only_planner, read_dcp_metadata

logger = logging.getLogger(__name__)

FORMAT = "slime-wf-megatron-checkpoint/2"
_PICKLED_RNG_FORMATS = ("slime-wf-megatron-checkpoint/1",)
_RNG_FORMAT = "slime-wf-rng/1"
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


def _rng_files(path: Path, rank: int) -> tuple[Path, Path]:
    stem = path / "rng" / f"rank{rank:05d}"
    return stem.with_suffix(".json"), stem.with_suffix(".safetensors")


def _as_state_tensor(state: Any, what: str) -> torch.Tensor:
    if not isinstance(state, torch.Tensor):
        raise TypeError(
            f"RNG state {what} is a {type(state).__name__}, not a tensor: it cannot be checkpointed"
        )
    return state.detach().cpu().contiguous()


def _save_rng_state(path: Path, rank: int) -> None:
    """This rank's RNG states as JSON (python's and numpy's: integers and floats) and safetensors
    (torch's, the device's and the Megatron tracker's: uint8 tensors)."""
    from megatron.core import tensor_parallel
    from safetensors.torch import save_file

    version, internal, gauss_next = random.getstate()
    bit_generator, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    tensors = {"torch": torch.get_rng_state()}
    device = cpu_shim.device_rng_state()
    for i, state in enumerate(device or []):
        tensors[f"device/{i}"] = _as_state_tensor(state, f"device/{i}")
    tracker = tensor_parallel.get_cuda_rng_tracker().get_states()
    for name, state in tracker.items():
        tensors[f"megatron_tracker/{name}"] = _as_state_tensor(state, f"megatron_tracker/{name}")
    described = {
        "format": _RNG_FORMAT,
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": bit_generator,
            "key": [int(k) for k in key],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "device_states": None if device is None else len(device),
        "megatron_tracker": list(tracker),
    }
    json_file, tensor_file = _rng_files(path, rank)
    json_file.write_text(json.dumps(described))
    save_file(tensors, str(tensor_file))


def _load_rng_state(path: Path, rank: int) -> bool:
    """Restore what `_save_rng_state` wrote for `rank`; False when the checkpoint has none."""
    from megatron.core import tensor_parallel
    from safetensors.torch import load_file

    json_file, tensor_file = _rng_files(path, rank)
    if not json_file.is_file():
        pickled = json_file.with_suffix(".pt")
        if pickled.is_file():
            raise ValueError(
                f"{pickled}: a pickled RNG state, as older slime-wf versions wrote; it is not loaded, since unpickling "
                "can run code. Start from the HF checkpoint (clear load), or load it with restore_rng=False"
            )
        return False
    described = json.loads(json_file.read_text())
    if described.get("format") != _RNG_FORMAT:
        raise ValueError(
            f"{json_file}: RNG state format {described.get('format')!r}, expected {_RNG_FORMAT!r}"
        )
    tensors = load_file(str(tensor_file))
    py = described["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    state = described["numpy"]
    np.random.set_state(
        (
            state["bit_generator"],
            np.asarray(state["key"], dtype=np.uint32),
            state["pos"],
            state["has_gauss"],
            state["cached_gaussian"],
        )
    )
    torch.set_rng_state(tensors["torch"])
    if described["device_states"] is not None:
        cpu_shim.set_device_rng_state([tensors[f"device/{i}"] for i in range(described["device_states"])])
    tensor_parallel.get_cuda_rng_tracker().set_states(
        {name: tensors[f"megatron_tracker/{name}"] for name in described["megatron_tracker"]}
    )
    return True


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
        raise TypeError(
            f"save_checkpoint: scheduler_state and extra must be JSON-serializable ({err})"
        ) from None

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
    _save_rng_state(tmp, _rank())
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
    if state.get("format") in _PICKLED_RNG_FORMATS:
        raise ValueError(
            f"checkpoint {str(path)!r} has format {state['format']!r}, written by an older slime-wf that pickled "
            "its RNG states; it is not loaded, since unpickling can run code. Start from the HF checkpoint (clear "
            "load, or point it at a folder without this checkpoint)"
        )
    if state.get("format") != FORMAT:
        raise ValueError(f"checkpoint {str(path)!r} has format {state.get('format')!r}, expected {FORMAT!r}")
    return state


def find_checkpoint(path: str | os.PathLike | None) -> Path | None:
    """The trainer checkpoint at `path`, or the latest one in the folder `path` (by rollout id,
    then step), or None when there is none (a missing folder included)."""
    if not path:
        return None
    root = Path(path)
    if (root / _STATE_FILE).is_file():
        return root
    if not root.is_dir():
        return None
    found = []
    for child in root.iterdir():
        if child.is_dir() and not child.name.startswith(".") and (child / _STATE_FILE).is_file():
            state = read_trainer_state(child)
            rollout_id = state.get("extra", {}).get("rollout_id")
            found.append(
                (-1 if rollout_id is None else int(rollout_id), state.get("step") or 0, child.name, child)
            )
    return max(found)[-1] if found else None


def _load_megatron(sharded: dict, directory: Path) -> dict:
    """`dist_checkpointing.load`, with torch's CheckpointException (a BaseException, which
    `except Exception` does not catch) turned into the error it wraps, or a RuntimeError."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        return dist_checkpointing.load(sharded, str(directory))
    except CheckpointException as err:
        for exc, _ in err.failures.values():
            if isinstance(exc, UnsafeCheckpointError):
                raise exc from None
        raise RuntimeError(f"loading the checkpoint shards in {directory} failed: {err}") from None


def load_checkpoint(
    path: str | os.PathLike, model, optimizer=None, *, restore_rng: bool = True
) -> dict[str, Any]:
    """Load a checkpoint saved by `save_checkpoint` into `model` (+ `optimizer`); a collective.

    Works at any tensor-parallel size. Returns the sidecar: `step`, `scheduler_state`,
    `extra`, and `rng_restored` (False when the saving layout differs from this one).
    """
    path = Path(path)
    state = read_trainer_state(path)
    if optimizer is not None and not state["has_optimizer"]:
        raise ValueError(f"checkpoint {str(path)!r} has no optimizer state; load it without an optimizer")
    gpt = unwrap_model(model)
    sharded = {"model": gpt.sharded_state_dict()}
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=True)
    read_dcp_metadata(path / _MEGATRON_DIR)  # before megatron-core unpickles it without restrictions
    install_weights_only_planner()
    loaded = _load_megatron(sharded, path / _MEGATRON_DIR)
    gpt.load_state_dict(loaded["model"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
        use_fused_adam(optimizer)

    state["rng_restored"] = False
    same_layout = all(state.get(k) == v for k, v in _layout().items())
    if restore_rng and same_layout:
        state["rng_restored"] = _load_rng_state(path, _rank())
    elif restore_rng:
        logger.info(
            "checkpoint %s was saved with layout %s; RNG states not restored",
            path,
            {k: state.get(k) for k in _layout()},
        )
    _barrier()
    return state
