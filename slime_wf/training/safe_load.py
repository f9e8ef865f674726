"""Loading a Megatron distributed checkpoint without unpickling arbitrary objects.

A checkpoint folder may come from anywhere (a shared filesystem, a copy from object storage), and
unpickling runs whatever code the pickle names. Three parts of a `dist_checkpointing` folder are
pickles:

- `common.pt` and the tensors in `*.distcp`: megatron-core and torch read them with
  `torch.load(weights_only=True)` (the default since torch 2.6), which only rebuilds tensors
  and plain containers;
- the sharded objects in `*.distcp` (the layers' `_extra_state`): torch's `DefaultLoadPlanner.
  load_bytes` reads them with `torch.load(weights_only=False)`; `install_weights_only_planner`
  gives megatron-core a planner that reads them with `weights_only=True`;
- `.metadata`, torch's description of the shards, read with `pickle.load`:
  `read_dcp_metadata` reads it first with an unpickler that resolves only the dataclasses of
  torch's checkpoint metadata, `torch.Size` and dtypes, and refuses anything else.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

DCP_METADATA_FILE = ".metadata"

# Modules whose own classes (dataclasses and enums describing shards) a DCP `.metadata` may name.
_DCP_CLASS_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner")
_DCP_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
}

_installed = False


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds a pickle that names something other than checkpoint data."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module in _DCP_CLASS_MODULES:
            import importlib

            found = getattr(importlib.import_module(module), name, None)
            if isinstance(found, type) and found.__module__ == module:
                return found
        raise pickle.UnpicklingError(
            f"names {module}.{name}, which is not part of torch's checkpoint metadata"
        )


def _unpickler_reason(err: Exception) -> str:
    """The line of torch's weights-only error that says what was refused (the rest of it explains
    how to load the file anyway, which is not advice to pass on here)."""
    for line in str(err).splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].split(". Please use", 1)[0].strip()
    return type(err).__name__


def read_dcp_metadata(directory: str | Path) -> Any:
    """The `.metadata` of a torch distributed checkpoint, unpickled with only the classes of
    torch's checkpoint metadata allowed. Raises `UnsafeCheckpointError` for anything else."""
    path = Path(directory) / DCP_METADATA_FILE
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, AttributeError, EOFError, ValueError, TypeError) as err:
        raise UnsafeCheckpointError(
            f"{path}: not loaded, since it is not plain torch checkpoint metadata ({err}); a checkpoint written by "
            "slime-wf never holds anything else: take it from where it was saved, or start again from the HF "
            "checkpoint"
        ) from None


def install_weights_only_planner() -> None:
    """Make megatron-core's torch strategy load sharded objects with `torch.load(weights_only=True)`
    (a subclass of its `MCoreLoadPlanner` in its place; idempotent, for every later load)."""
    global _installed
    if _installed:
        return
    from megatron.core.dist_checkpointing.strategies import torch as megatron_torch_strategy
    from torch.distributed.checkpoint._traverse import set_element

    class WeightsOnlyLoadPlanner(megatron_torch_strategy.MCoreLoadPlanner):
        """`DefaultLoadPlanner.load_bytes`, with weights_only=True."""

        def load_bytes(self, read_item, value) -> None:
            try:
                loaded = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as err:
                raise UnsafeCheckpointError(
                    f"checkpoint object {read_item.dest_index.fqn!r} is not plain data (tensors, numbers, strings, "
                    f"containers) and is not loaded ({_unpickler_reason(err)}); a checkpoint written by slime-wf "
                    "never holds anything else: take it from where it was saved, or start again from the HF checkpoint"
                ) from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    megatron_torch_strategy.MCoreLoadPlanner = WeightsOnlyLoadPlanner
    _installed = True
