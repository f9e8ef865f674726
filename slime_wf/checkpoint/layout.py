"""What a checkpoint folder holds, told from its files alone (nothing is loaded).

- a Hugging Face checkpoint: `config.json` beside `*.safetensors`; FP8 when config.json carries an
  FP8 `quantization_config` (see `fp8_format.Fp8Format.of_checkpoint`);
- a slime-wf trainer checkpoint: `trainer_state.json` beside `megatron/` (slime_wf/training/checkpointing.py),
  or a folder of such checkpoints (the run store's `checkpoints/`);
- a Megatron-LM `torch_dist` checkpoint, as slime's `tools/convert_hf_to_torch_dist.py` and its
  trainer write them: `latest_checkpointed_iteration.txt` beside `iter_0000000/` folders that hold
  `.metadata` and `common.pt` (or `mp_rank_*/` in the older format). Its parameter names follow
  Megatron-LM's Transformer Engine layer spec, not this project's, so it is refused with a message
  that names the way out.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from slime_wf.checkpoint import CheckpointError

CONFIG = "config.json"
TRAINER_STATE = "trainer_state.json"
MEGATRON_TRACKER = "latest_checkpointed_iteration.txt"
_ITER_DIR = re.compile(r"^iter_\d{7}$")


def hf_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """config.json of the folder `path`, or None when it has none."""
    file = Path(path) / CONFIG
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file} is not valid JSON ({err}); is the download complete?") from None


def is_hf_checkpoint(path: str | os.PathLike | None) -> bool:
    """config.json and at least one safetensors file: what the trainer can initialise from."""
    if not path or not (Path(path) / CONFIG).is_file():
        return False
    return any(Path(path).glob("*.safetensors"))


def hf_quantization_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The `quantization_config` of the HF checkpoint at `path` (None: plain weights, or no config)."""
    config = hf_config(path) or {}
    return config.get("quantization_config") or None


def holds_trainer_checkpoint(path: str | os.PathLike | None) -> bool:
    """A slime-wf trainer checkpoint at `path`, or one directly under it."""
    if not path or not Path(path).is_dir():
        return False
    root = Path(path)
    if (root / TRAINER_STATE).is_file():
        return True
    return any(
        c.is_dir() and not c.name.startswith(".") and (c / TRAINER_STATE).is_file() for c in root.iterdir()
    )


def _is_dist_folder(folder: Path) -> str | None:
    marks = [n for n in (".metadata", "common.pt") if (folder / n).is_file()]
    if marks:
        return " and ".join(marks)
    if any(p.is_dir() for p in folder.glob("mp_rank_*")):
        return "mp_rank_*/"
    return None


def megatron_checkpoint_evidence(path: str | os.PathLike | None) -> str | None:
    """What marks `path` as a Megatron-LM checkpoint (slime's torch_dist format), or None when it is not one."""
    if not path or not Path(path).is_dir():
        return None
    root = Path(path)
    if (root / TRAINER_STATE).is_file():
        return None
    iters = sorted(p.name for p in root.iterdir() if p.is_dir() and _ITER_DIR.match(p.name))
    if (root / MEGATRON_TRACKER).is_file():
        return MEGATRON_TRACKER + (f" and {iters[-1]}/" if iters else "")
    for name in reversed(iters):
        marks = _is_dist_folder(root / name)
        if marks:
            return f"{name}/ with {marks}"
    marks = _is_dist_folder(root)
    if marks:
        return f"{marks} (one iteration of a torch_dist checkpoint)"
    return None


def refuse_megatron_checkpoint(path: str | os.PathLike | None, what: str) -> None:
    """Raise CheckpointError when `path` (the setting `what`) is a Megatron-LM / slime torch_dist checkpoint."""
    evidence = megatron_checkpoint_evidence(path)
    if evidence is None or path is None:  # no evidence without a path
        return
    parent = Path(path).resolve().parent
    if (parent / TRAINER_STATE).is_file():
        raise CheckpointError(
            f"{what}={str(path)!r} is the megatron/ folder inside the slime-wf trainer checkpoint {str(parent)!r}: "
            f"set {what} to {str(parent)!r}"
        )
    raise CheckpointError(
        f"{what}={str(path)!r} is a Megatron-LM torch_dist checkpoint ({evidence}), the format slime's "
        "tools/convert_hf_to_torch_dist.py writes. Its parameters are named after Megatron-LM's Transformer Engine "
        "layer spec, which slime-wf does not use, so it cannot be loaded. Set "
        f"{what} to the Hugging Face BF16 directory it was converted from (e.g. the folder `slime-wf download "
        "Qwen/Qwen3-4B --cache-dir DIR` prints), or convert it back first with slime's "
        "tools/convert_torch_dist_to_hf.py."
    )
