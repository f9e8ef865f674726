"""`slime.rollout.base_types`: what a custom rollout function returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from slime_wf.types import Sample


@dataclass
class RolloutFnTrainOutput:
    samples: list[list[Sample]]
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class RolloutFnEvalOutput:
    data: dict[str, dict[str, Any]]
    metrics: dict[str, Any] | None = None


__all__ = ["RolloutFnEvalOutput", "RolloutFnTrainOutput"]
