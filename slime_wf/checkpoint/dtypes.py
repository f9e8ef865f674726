"""Dtype names as settings, checkpoints and the weight-update protocol spell them: torch's own
(`bfloat16`, `float8_e4m3fn`), as in HF's `torch_dtype`, the config's `params_dtype`, the engine
server's `--dtype` and SGLang's weight-update requests (which resolve them with `getattr(torch, name)`).
Safetensors headers use codes of their own (`safetensors_stream.TORCH_DTYPES`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# what models compute in; the settings that pick one offer these, or a subset
FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(
    name: str, what: str, *, choices: Sequence[str] | None = None, auto: torch.dtype | None = None
) -> torch.dtype:
    """The torch dtype called `name`.

    `what` names the setting that gave it, for the error; `choices` limits the names (default: any
    torch dtype); `auto`, when given, is what the name "auto" stands for. Anything else raises
    ValueError naming `what` and the names it takes.
    """
    if name == "auto" and auto is not None:
        return auto
    value = getattr(torch, name, None) if isinstance(name, str) else None
    if isinstance(value, torch.dtype) and (choices is None or name in choices):
        return value
    if choices is None:
        raise ValueError(f"{what} {name!r} is not a torch dtype (e.g. 'bfloat16', 'float32')")
    names = (["auto"] if auto is not None else []) + list(choices)
    raise ValueError(f"{what} {name!r} is not one of {', '.join(names)}")


def dtype_name(dtype: torch.dtype) -> str:
    """The name `torch_dtype` reads back: `torch.bfloat16` -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")
