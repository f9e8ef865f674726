"""Make megatron-core run on a machine without CUDA (CPU tensors, gloo).

megatron-core assumes a GPU in a handful of places: it allocates scratch tensors on
`torch.cuda.current_device()`, builds tensors with `device="cuda"`, waits on CUDA streams and
calls `torch.cuda.synchronize()`. On a CPU-only torch each of those raises "Torch not compiled
with CUDA enabled". This module is the only place in slime-wf that knows about the difference:

- `install()` patches those assumptions, and only when `torch.cuda.is_available()` is False;
  with CUDA it does nothing, so callers call it unconditionally.
- `import_megatron()` (which `install()` calls first) imports megatron-core with its warnings about
  the missing fused kernels silenced for that import only.
- `distributed_backend()`, `rng_tracker_options()` and `local_device()` answer the few
  questions whose answer differs between CPU and GPU, so no other module branches on CUDA.

How it patches: each megatron module listed in `_MODULES_USING_CUDA` gets its module-level name
`torch` replaced by `_CPU_TORCH`, a stand-in that forwards everything to the real `torch`
except `torch.cuda` (device queries answer "cpu", streams and synchronization are no-ops)
and the tensor factories (`device="cuda"` becomes `device="cpu"`). Only code inside those
modules sees the stand-in; `torch` itself is untouched. One function is replaced outright
(see `_clip_grads_by_total_norm`), because it asserts on the CUDA tensor type name.

Supported on CPU: forward/backward of the GPT model at any tensor-parallel and data-parallel
size, Megatron DDP, Megatron's optimizer with fp32 parameters (`FP32Optimizer`), gradient
clipping, the no-pipelining forward/backward schedule, and `dist_checkpointing` save/load. Not supported: the mixed-precision and the
distributed optimizer (both reject parameters whose type name is not `torch.cuda.*Tensor`),
sequence parallelism, fused kernels, CUDA graphs.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

logger = logging.getLogger(__name__)

# megatron.core module -> the CUDA assumption that made it need the stand-in.
_MODULES_USING_CUDA: dict[str, str] = {
    "megatron.core.models.common.embeddings.rotary_pos_embedding": (
        "RotaryEmbedding.get_emb moves inv_freq to torch.cuda.current_device() on the first forward"
    ),
    "megatron.core.utils": (
        "GlobalMemoryBuffer (attention score scratch) allocates on torch.cuda.current_device(); "
        "the fallback multi-tensor l2 norm builds its result with device='cuda'"
    ),
    "megatron.core.tensor_parallel.mappings": (
        "all-gather / reduce-scatter outputs are allocated on torch.cuda.current_device() "
        "(gathering vocab-parallel logits at tensor-parallel size > 1)"
    ),
    "megatron.core.distributed.distributed_data_parallel": (
        "DDP creates CUDA streams and calls torch.cuda.synchronize() / empty_cache()"
    ),
    "megatron.core.distributed.param_and_grad_buffer": (
        "gradient buffers are allocated on torch.cuda.current_device(); grad sync waits on streams"
    ),
    "megatron.core.optimizer.optimizer": (
        "optimizers create their loss-scale and overflow tensors with device='cuda'"
    ),
    "megatron.core.optimizer.clip_grads": "grad-norm accumulators are created with device='cuda'",
    "megatron.core.pipeline_parallel.schedules": (
        "forward_backward_no_pipelining counts tokens in a tensor created with device='cuda'"
    ),
    "megatron.core.dist_checkpointing.strategies.filesystem_async": (
        "checkpoint writing calls torch.cuda.synchronize() before copying tensors out"
    ),
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": (
        "the end of a save all-reduces a failure flag allocated on torch.cuda.current_device()"
    ),
}

_installed = False


class _NullStream:
    """A CUDA stream stand-in: on CPU every operation is already ordered, so waiting is a no-op."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        return event


class _CpuCuda:
    """What `torch.cuda` means inside the patched megatron modules: the CPU."""

    Stream = _NullStream

    @staticmethod
    def current_device() -> str:
        return "cpu"

    @staticmethod
    def synchronize(device: Any = None) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass

    @staticmethod
    def current_stream(device: Any = None) -> _NullStream:
        return _NullStream()

    @staticmethod
    def default_stream(device: Any = None) -> _NullStream:
        return _NullStream()

    @staticmethod
    def stream(stream: Any) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()

    def __getattr__(self, name: str) -> Any:
        # Anything not listed above behaves as the real torch.cuda does (and fails loudly if used).
        return getattr(torch.cuda, name)


def _on_cpu_instead_of_cuda(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(factory)
    def wrapper(*args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
        if device is not None and torch.device(device).type == "cuda":
            device = "cpu"
        return factory(*args, device=device, **kwargs)

    return wrapper


class _CpuTorch(types.ModuleType):
    """`torch` as seen by the patched megatron modules (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in ("tensor", "zeros", "ones", "empty", "full", "arange"):
            setattr(self, name, _on_cpu_instead_of_cuda(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


_CPU_TORCH = _CpuTorch()


def _clip_grads_by_total_norm(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    max_norm: float,
    total_norm: float,
    use_decoupled_grad: bool = False,
) -> None:
    """Scale gradients in place so that their total norm is at most `max_norm`.

    Replaces megatron's `clip_grad_by_total_norm_fp32` in the optimizer module: the original
    asserts `grad.type() == 'torch.cuda.FloatTensor'`, which no device stand-in can satisfy.
    The arithmetic is the same (grad * max_norm / (total_norm + 1e-6) when that is below 1).
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    for grad in grads:
        if grad.dtype != torch.float32:
            raise TypeError(f"gradient clipping on CPU expects fp32 gradients, got {grad.dtype}")
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for grad in grads:
            grad.mul_(clip_coeff)


def is_active() -> bool:
    """True when megatron-core runs on CPU through this shim (no CUDA device)."""
    return not torch.cuda.is_available()


# megatron-core warns when imported that the optional fused kernels (Apex, Transformer Engine) are
# missing and that it falls back to plain torch: slime-wf uses those fallbacks on purpose, on any device.
_FUSED_KERNEL_WARNING = r".*(Apex|Transformer Engine).* (is|are) not installed"
# The modules whose import gives that warning: megatron.core itself, the GPT model and its layer specs.
_MODULES_WARNING_AT_IMPORT = (
    "megatron.core",
    "megatron.core.models.gpt",
    "megatron.core.models.gpt.gpt_layer_specs",
)


@functools.cache
def import_megatron() -> None:
    """Import megatron-core, with the fused-kernel fallback warnings silenced around that import alone
    (a process-wide filter would also hide them from the rest of the process). Call it before any
    other import of megatron; `install()` does.

    megatron-core wraps its optional fused kernels in `torch.compile` when its modules are imported
    (`megatron.core.jit.jit_fuser`), and that call imports TorchDynamo and Inductor's compiler: about
    2 s of every trainer process's start on 2 cores (torch.optim imports TorchDynamo later anyway, but
    not the compiler). slime-wf's models turn those fusions off
    (`bias_activation_fusion`, `bias_dropout_fusion`, ... in `model.build_gpt_model`), so the kernels
    are never called; they are left undecorated (plain eager functions, should anything call them)
    by an identity `torch.compile` during this import alone."""
    with warnings.catch_warnings(), _identity_torch_compile():
        warnings.filterwarnings("ignore", message=_FUSED_KERNEL_WARNING, category=UserWarning)
        for name in _MODULES_WARNING_AT_IMPORT:
            importlib.import_module(name)


@contextlib.contextmanager
def _identity_torch_compile():
    def identity(model=None, **_options):
        return model if model is not None else (lambda fn: fn)

    compile_fn = torch.compile
    torch.compile = identity
    try:
        yield
    finally:
        torch.compile = compile_fn


def install() -> None:
    """Import megatron-core (`import_megatron`) and patch it for CPU; the patching is a no-op when CUDA
    is available or when already installed."""
    global _installed
    import_megatron()
    if _installed or not is_active():
        return
    # Typed Any: a module object declares no attributes to assign, and megatron-core ships no types.
    module: Any
    for module_name in _MODULES_USING_CUDA:
        module = importlib.import_module(module_name)
        module.torch = _CPU_TORCH
    module = importlib.import_module("megatron.core.optimizer.optimizer")
    module.clip_grad_by_total_norm_fp32 = _clip_grads_by_total_norm
    _installed = True
    logger.debug("megatron-core CPU shim installed for %d modules", len(_MODULES_USING_CUDA))


def distributed_backend() -> str:
    """The torch.distributed backend for this machine: nccl with CUDA, gloo without."""
    return "gloo" if is_active() else "nccl"


def local_device(local_rank: int = 0) -> torch.device:
    """The device this process computes on; with CUDA it also makes that device current."""
    if is_active():
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def rng_tracker_options() -> dict[str, bool]:
    """Keyword arguments for `tensor_parallel.model_parallel_cuda_manual_seed`.

    Megatron's training RNG tracker snapshots CUDA generator states, which do not exist on
    CPU; its inference tracker keeps no state and makes `fork()` a no-op. That loses only
    the per-rank dropout streams, and slime-wf trains with dropout 0.
    """
    return {"inference_rng_tracker": is_active()}


def transformer_config_options() -> dict[str, bool]:
    """TransformerConfig settings that depend on the device.

    Without CUDA, Megatron must create parameters on the CPU (`use_cpu_initialization`);
    with CUDA it creates them on the current device directly.
    """
    return {"use_cpu_initialization": is_active()}


def check_trainable(params_dtype: torch.dtype, use_distributed_optimizer: bool) -> None:
    """Refuse the optimizer settings the shim cannot run on CPU, with the reason."""
    if not is_active():
        return
    if params_dtype != torch.float32:
        raise ValueError(
            f"training on CPU needs params_dtype=float32, got {params_dtype}: megatron's mixed-precision "
            "optimizer accepts only CUDA tensor types"
        )
    if use_distributed_optimizer:
        raise ValueError(
            "use_distributed_optimizer=True is not available on CPU: megatron's distributed optimizer "
            "accepts only CUDA tensor types"
        )


def device_rng_state() -> list[torch.Tensor] | None:
    """The accelerator's RNG states (for checkpoints); None on CPU."""
    return None if is_active() else torch.cuda.get_rng_state_all()


def set_device_rng_state(state: list[torch.Tensor] | None) -> None:
    """Restore what `device_rng_state` returned (ignored on CPU or when None)."""
    if state is not None and not is_active():
        torch.cuda.set_rng_state_all(state)
