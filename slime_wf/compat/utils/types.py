"""`slime.utils.types`: the sample type, and slime's multimodal type names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from slime_wf.types import Group, Sample

RolloutBatch = dict[str, Any]
"""A batch of per-sample lists on its way to training (slime's name for it)."""


@dataclass
class MultimodalType:
    name: str  # the type's name in message content, e.g. "image"
    placeholder: str  # its placeholder in conversation text, e.g. "<image>"


class MultimodalTypes:
    IMAGE = MultimodalType(name="image", placeholder="<image>")
    VIDEO = MultimodalType(name="video", placeholder="<video>")
    AUDIO = MultimodalType(name="audio", placeholder="<audio>")

    @classmethod
    def all(cls) -> list[MultimodalType]:
        return [cls.IMAGE, cls.VIDEO, cls.AUDIO]

    @classmethod
    def get(cls, name: str) -> MultimodalType | None:
        return next((m for m in cls.all() if m.name == name), None)


__all__ = ["Group", "MultimodalType", "MultimodalTypes", "RolloutBatch", "Sample"]
