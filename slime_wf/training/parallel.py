"""torch.distributed and Megatron model-parallel state for one training process.

Under torchrun (WORLD_SIZE set in the environment) the process group comes from the usual
env:// rendezvous. Without it, a world of one is created in-process from an in-memory store,
so a plain Python process (a test, the flow's worker) needs no launcher and no free port.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from slime_wf.training import cpu_shim

logger = logging.getLogger(__name__)

# True when init_parallel created the process group, so destroy_parallel may tear it down.
_owns_process_group = False


@dataclass(frozen=True)
class ParallelInfo:
    """Where this process sits in the world."""

    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    dp_rank: int
    dp_size: int
    device: torch.device


def init_process_group(timeout_minutes: int = 30) -> None:
    """torch.distributed's default group, once per process: from torchrun's environment, else a world of
    one. The trainer service creates it before the trainer, to receive the trainer's settings over it."""
    from datetime import timedelta

    global _owns_process_group
    cpu_shim.install()
    if dist.is_initialized():
        return
    timeout = timedelta(minutes=timeout_minutes)
    backend = cpu_shim.distributed_backend()
    if "WORLD_SIZE" in os.environ:
        cpu_shim.local_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        cpu_shim.local_device(0)
        dist.init_process_group(
            backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )
    _owns_process_group = True


def init_parallel(tp_size: int = 1, *, seed: int = 1234, timeout_minutes: int = 30) -> ParallelInfo:
    """Initialize torch.distributed (if needed), Megatron's model-parallel groups and RNG seeds.

    `seed` seeds torch's CPU generator (Megatron initializes weights on CPU with it when
    `use_cpu_initialization` is set, identically at every tensor-parallel size) and Megatron's
    tensor-parallel RNG tracker.
    """
    cpu_shim.import_megatron()  # megatron's first import in a process, its fallback warnings scoped to it
    from megatron.core import parallel_state, tensor_parallel

    if tp_size < 1:
        raise ValueError(f"init_parallel: tp_size must be >= 1, got {tp_size}")
    if parallel_state.model_parallel_is_initialized():
        raise RuntimeError(
            "init_parallel: model parallel state is already initialized; call destroy_parallel() first"
        )
    init_process_group(timeout_minutes)

    world_size = dist.get_world_size()
    if world_size % tp_size:
        raise ValueError(
            f"init_parallel: tp_size={tp_size} does not divide the world size {world_size}; "
            f"launch a multiple of {tp_size} processes (torchrun --nproc-per-node)"
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp_size, distributed_timeout_minutes=timeout_minutes
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(
        seed, force_reset_rng=True, **cpu_shim.rng_tracker_options()
    )
    info = parallel_info()
    logger.info("parallel state: %s", info)
    return info


def parallel_info() -> ParallelInfo:
    """This process's ranks and sizes (after init_parallel)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("parallel state is not initialized: call init_parallel() first")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return ParallelInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        device=cpu_shim.local_device(local_rank),
    )


def destroy_parallel() -> None:
    """Tear down Megatron's groups and, if init_parallel created it, the process group.

    Safe to call when nothing is initialized, so tests can call it unconditionally.
    """
    from megatron.core import parallel_state

    global _owns_process_group
    parallel_state.destroy_model_parallel()
    if _owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
    _owns_process_group = False
