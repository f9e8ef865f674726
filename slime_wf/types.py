"""Samples and the batch types passed between rollout and training.

`Sample` keeps slime's field names and `Sample.Status` values so that a slime user's
plugins (reward functions, filters, generate functions) work unchanged. Unlike slime,
samples are persisted as JSON, never pickled: `to_dict` / `from_dict` round-trip
losslessly through `json.dumps` / `json.loads`, and `to_json` is one line whatever the text holds.
`write_samples_jsonl` / `read_samples_jsonl` hold a list of them as a JSON-lines file: the form in
which the trainer service receives what it trains on.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

from slime_wf.store import json_text, jsonl_lines


class RewardKeyError(KeyError):
    """A dict reward has no entry for the configured `reward_key`."""


@dataclass
class Sample:
    """One prompt/response pair, as it moves from the data source to the trainer."""

    group_index: int | None = None
    index: int | None = None
    prompt: str | list[dict[str, Any]] = ""
    tokens: list[int] = field(default_factory=list)
    response: str = ""
    response_length: int = 0
    label: Any = None
    reward: float | dict[str, Any] | None = None
    loss_mask: list[int] | None = None
    rollout_log_probs: list[float] | None = None
    weight_versions: list[str] = field(default_factory=list)

    class Status(Enum):
        PENDING = "pending"
        COMPLETED = "completed"
        TRUNCATED = "truncated"
        ABORTED = "aborted"
        # Recoverable failure (a request that timed out twice, a tool error): the sample may hold
        # partial output and is accounted for rather than silently lost.
        FAILED = "failed"

    status: Status = Status.PENDING
    metadata: dict[str, Any] = field(default_factory=dict)
    remove_sample: bool = False
    custom_rm_path: str | None = None
    generate_function_path: str | None = None
    train_metadata: dict[str, Any] | None = None

    # ---- serialization -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict; `Sample.from_dict` inverts it exactly."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["status"] = self.status.value
        return copy.deepcopy(out)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sample:
        data = dict(data)
        status = data.pop("status", cls.Status.PENDING.value)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"Sample.from_dict: unknown field(s) {unknown}; known fields are {sorted(known)}"
            )
        try:
            status = cls.Status(status)
        except ValueError:
            allowed = [s.value for s in cls.Status]
            raise ValueError(f"Sample.from_dict: status {status!r} is not one of {allowed}") from None
        return cls(status=status, **copy.deepcopy(data))

    def to_json(self) -> str:
        try:
            return json_text(self.to_dict())
        except TypeError as err:
            raise TypeError(
                f"sample group_index={self.group_index} index={self.index} cannot be stored as JSON: {err}. "
                "Keep metadata, label and reward to JSON types (str, int, float, bool, None, list, dict)."
            ) from err

    @classmethod
    def from_json(cls, text: str) -> Sample:
        return cls.from_dict(json.loads(text))

    # ---- slime's helpers -----------------------------------------------------------------

    def get_reward_value(self, args: Any) -> float | None:
        """The scalar reward: the whole reward, or `reward[args.reward_key]` when a key is set; None
        while the sample is not rewarded yet."""
        reward_key = getattr(args, "reward_key", None)
        if not reward_key:
            if isinstance(self.reward, dict):
                raise RewardKeyError(
                    f"sample index={self.index} has a dict reward with keys {sorted(self.reward)}; "
                    "set reward_key to the entry to train on (for rm_type dapo: reward_key=score)"
                )
            return self.reward
        if not isinstance(self.reward, dict) or reward_key not in self.reward:
            have = sorted(self.reward) if isinstance(self.reward, dict) else type(self.reward).__name__
            raise RewardKeyError(
                f"sample index={self.index}: reward_key={reward_key!r} not found in its reward ({have})"
            )
        return self.reward[reward_key]

    @property
    def effective_response_length(self) -> int:
        """Tokens that count for the loss: masked tokens (e.g. off-policy partial-rollout ones) do not."""
        return sum(self.loss_mask) if self.loss_mask is not None else self.response_length

    def update_from_meta_info(self, meta_info: dict[str, Any]) -> None:
        """Record the weight version(s) and finish status reported by an SGLang-API engine.

        An engine whose weights changed mid-request may list the versions that produced its tokens
        (`weight_versions` spans, oldest first); each is recorded, so a sample never hides a mix.
        """
        spans = meta_info.get("weight_versions")
        if isinstance(spans, list) and spans and all(isinstance(s, dict) and "version" in s for s in spans):
            self.weight_versions.extend(str(s["version"]) for s in spans)
        elif "weight_version" in meta_info:
            self.weight_versions.append(str(meta_info["weight_version"]))
        finish_type = (meta_info.get("finish_reason") or {}).get("type")
        # keyed by str, looked up with whatever JSON value the engine sent
        statuses: dict[Any, Sample.Status] = {
            "length": Sample.Status.TRUNCATED,
            "abort": Sample.Status.ABORTED,
            "stop": Sample.Status.COMPLETED,
        }
        status = statuses.get(finish_type)
        if status is not None:
            self.status = status

    def clone(self) -> Sample:
        return copy.deepcopy(self)


Group = list[Sample]
"""The `n_samples_per_prompt` samples generated from one prompt (one GRPO group)."""


# ---- samples as JSON lines (how the trainer service receives them) -------------------------------


def write_samples_jsonl(samples: Iterable[Sample], path: str | os.PathLike[str]) -> Path:
    """The samples, one JSON line each (line-safe whatever their text holds), written atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for sample in samples:
            f.write(sample.to_json() + "\n")
    tmp.rename(path)
    return path


def read_samples_jsonl(path: str | os.PathLike[str]) -> list[Sample]:
    with open(path, encoding="utf-8", newline="\n") as f:  # split on "\n" only, as the store does
        return parse_samples_jsonl(f.read(), str(path))


def parse_samples_jsonl(text: str, where: str) -> list[Sample]:
    """The samples of JSON-lines `text`; a line that is not a sample is named by `where`:line."""
    samples = []
    for line_no, line in jsonl_lines(text):
        try:
            samples.append(Sample.from_json(line))
        except ValueError as err:
            raise ValueError(f"{where}:{line_no}: not a sample: {err}") from None
    return samples
