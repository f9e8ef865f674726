"""Samples and the batch types passed between rollout and training.

`Sample` keeps slime's field names and `Sample.Status` values so that a slime user's
plugins (reward functions, filters, generate functions) work unchanged. Unlike slime,
samples are persisted as JSON, never pickled: `to_dict` / `from_dict` round-trip
losslessly through `json.dumps` / `json.loads`, and `to_json` is one line whatever the text holds.
`write_samples_jsonl` / `read_samples_jsonl` hold a list of them as a JSON-lines file: the form in
which the trainer service receives what it trains on.

It has every field and method of slime's `Sample` (`slime.utils.types.Sample` is this very class
when plugins run under slime-wf; see `slime_wf/compat`). Where slime keeps torch tensors (top-p
replay, routed experts, multimodal inputs), this class keeps lists: a plugin may assign tensors,
and `to_dict` stores them as lists.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

from slime_wf import _sample_meta as meta
from slime_wf.store import json_text, jsonl_lines

# Fields that may hold tensors or arrays (a plugin's, or slime's habits): stored as lists.
_ARRAY_FIELDS = (
    "tokens",
    "rollout_log_probs",
    "teacher_log_probs",
    "rollout_top_p_token_ids",
    "rollout_top_p_token_offsets",
    "rollout_routed_experts",
    "multimodal_inputs",
    "multimodal_train_inputs",
    "multimodal_generation_inputs",
)


class RewardKeyError(KeyError):
    """A dict reward has no entry for the configured `reward_key`."""


_ATOMS = (str, int, float, bool, type(None))
_COUNTERS = (meta.SpecInfo, meta.PrefixCacheInfo)


def _copied(value: Any) -> Any:
    """A deep copy of a JSON-like value (dicts, lists, atoms) built directly, several times faster than
    `copy.deepcopy`; other objects inside go through `copy.deepcopy`."""
    kind = type(value)
    if kind in _ATOMS:
        return value
    if kind is list:
        if all(type(v) in _ATOMS for v in value):
            return list(value)
        return [_copied(v) for v in value]
    if kind is dict:
        return {k: _copied(v) for k, v in value.items()}
    if kind in _COUNTERS:  # numbers only: a shallow copy is a deep one, at a tenth of deepcopy's cost
        counters = object.__new__(kind)
        counters.__dict__.update(value.__dict__)
        return counters
    return copy.deepcopy(value)


_FIELD_NAMES: dict[type, frozenset[str]] = {}  # by class: from_dict is called for every stored sample


def _field_names(cls: type) -> frozenset[str]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = frozenset(f.name for f in fields(cls))
    return names


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

    # ---- the rest of slime's fields --------------------------------------------------------
    # the rollout execution this sample came from; samples split from one execution share it
    rollout_id: int | None = None
    session_id: str | None = None  # routing key for a consistent-hashing router
    multimodal_inputs: dict[str, Any] | None = None
    multimodal_train_inputs: dict[str, Any] | None = None
    multimodal_train_input_id: str | None = None
    multimodal_generation_inputs: dict[str, Any] | None = None
    apply_chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    # top-p replay: response token i kept rollout_top_p_token_ids[offsets[i]:offsets[i + 1]]
    rollout_top_p_token_ids: list[int] | None = None
    rollout_top_p_token_offsets: list[int] | None = None
    rollout_routed_experts: list[list[list[int]]] | None = None  # [tokens - 1, layers, topk]
    teacher_log_probs: list[float] | None = None
    non_generation_time: float = 0.0  # seconds spent outside the engine (tools, environments)

    SpecInfo: ClassVar[type[meta.SpecInfo]] = meta.SpecInfo  # slime's nested names
    PrefixCacheInfo: ClassVar[type[meta.PrefixCacheInfo]] = meta.PrefixCacheInfo
    spec_info: meta.SpecInfo = field(default_factory=meta.SpecInfo)
    prefix_cache_info: meta.PrefixCacheInfo = field(default_factory=meta.PrefixCacheInfo)

    # ---- serialization -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict; `Sample.from_dict` inverts it exactly."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["status"] = self.status.value
        out["spec_info"] = self.spec_info.to_dict()
        out["prefix_cache_info"] = self.prefix_cache_info.to_dict()
        for name in _ARRAY_FIELDS:
            value = out[name]
            if value is not None and not (
                isinstance(value, list) and (not value or type(value[0]) in (int, float))
            ):
                out[name] = meta.plain(value)
        return _copied(out)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sample:
        data = dict(data)
        status = data.pop("status", cls.Status.PENDING.value)
        known = _field_names(cls)
        unknown = sorted(data.keys() - known)
        if unknown:
            raise ValueError(
                f"Sample.from_dict: unknown field(s) {unknown}; known fields are {sorted(known)}"
            )
        try:
            status = cls.Status(status)
        except ValueError:
            allowed = [s.value for s in cls.Status]
            raise ValueError(f"Sample.from_dict: status {status!r} is not one of {allowed}") from None
        data = _copied(data)
        data["spec_info"] = meta.SpecInfo.from_dict(data.get("spec_info") or {})
        data["prefix_cache_info"] = meta.PrefixCacheInfo.from_dict(data.get("prefix_cache_info") or {})
        return cls(status=status, **data)

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
        """A deep copy (a rollout clones each prompt's sample n times, so this is on the hot path:
        JSON-like values are copied directly, anything else through `copy.deepcopy`)."""
        new = copy.copy(self)
        for f in fields(self):
            value = getattr(self, f.name)
            if type(value) not in _ATOMS and not isinstance(value, Enum):
                setattr(new, f.name, _copied(value))
        return new

    def append_response_tokens(
        self,
        args: Any = None,
        *,
        tokens: Any = None,
        log_probs: Any = None,
        trainable: bool = True,
        meta_info: dict[str, Any] | None = None,
        text: str | None = None,
        update_terminal_info: bool = True,
    ) -> None:
        """Append response tokens and keep loss mask, log-probs and top-p spans aligned (slime's contract).

        The model's tokens: `trainable=True` with the engine's `log_probs` and `meta_info`. Tool or
        environment tokens: `trainable=False`, no log-probs; they get loss mask 0, log-prob 0.0 and
        empty top-p spans, so they carry no loss and every per-token list stays `response_length` long.
        """
        new = meta.int_list(tokens)
        lps = meta.float_list(log_probs)
        if lps is not None and len(lps) != len(new):
            raise ValueError(f"log_probs has {len(lps)} entries but tokens has {len(new)}")
        if new and trainable and lps is None:
            raise ValueError("trainable response tokens need the engine's log-probs (log_probs=...)")
        if new and not trainable:
            if lps is not None:
                raise ValueError("tool/environment tokens (trainable=False) take no log_probs")
            lps = [0.0] * len(new)
        if text is not None:
            self.response += text
        before = self.response_length
        if new:
            self.tokens = list(self.tokens) + new
            self.response_length += len(new)
            if self.loss_mask is None:
                self.loss_mask = [1] * before
            self.loss_mask = list(self.loss_mask) + [1 if trainable else 0] * len(new)
        if lps is not None:
            if self.rollout_log_probs is None:
                if trainable and before:
                    raise ValueError(
                        f"sample index={self.index} has {before} response tokens without rollout_log_probs; "
                        "trainable tokens with log-probs cannot follow them"
                    )
                self.rollout_log_probs = [0.0] * before
            self.rollout_log_probs = list(self.rollout_log_probs) + lps
        if meta_info is not None or (new and not trainable):
            self._apply_meta_info(
                args,
                meta_info or {},
                new_tokens=len(new),
                pad_top_p=bool(new and not trainable),
                terminal=update_terminal_info,
            )
        self._check_response_lengths()

    def _apply_meta_info(
        self, args: Any, meta_info: dict[str, Any], *, new_tokens: int, pad_top_p: bool, terminal: bool
    ) -> None:
        spans = meta.top_p_spans(meta_info, new_tokens) if new_tokens else None
        if spans is not None:
            if self.rollout_top_p_token_ids is None and self.rollout_top_p_token_offsets is None:
                self.rollout_top_p_token_ids, self.rollout_top_p_token_offsets = spans
            else:
                self.rollout_top_p_token_ids, self.rollout_top_p_token_offsets = meta.merge_top_p(
                    self.rollout_top_p_token_ids, self.rollout_top_p_token_offsets, *spans
                )
        elif pad_top_p and new_tokens and self.rollout_top_p_token_offsets is not None:
            self.rollout_top_p_token_ids, self.rollout_top_p_token_offsets = meta.pad_top_p(
                self.rollout_top_p_token_ids, self.rollout_top_p_token_offsets, new_tokens
            )
        experts = meta.routed_experts(self.rollout_routed_experts, meta_info, len(self.tokens), args)
        if experts is not None:
            self.rollout_routed_experts = experts
        if not terminal or "finish_reason" not in meta_info:
            return
        if getattr(args, "sglang_speculative_algorithm", None):
            self.spec_info.add(meta_info)
        self.prefix_cache_info.add(meta_info)
        self.update_from_meta_info(meta_info)

    def _check_response_lengths(self) -> None:
        n = self.response_length
        for name in ("loss_mask", "rollout_log_probs"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(
                    f"sample index={self.index}: {name} has {len(value)} entries, response_length is {n}"
                )
        ids, offsets = self.rollout_top_p_token_ids, self.rollout_top_p_token_offsets
        if ids is None and offsets is None:
            return
        if ids is None or offsets is None:
            raise ValueError(f"sample index={self.index}: top-p replay needs both token ids and offsets")
        offsets = meta.int_list(offsets)
        if len(offsets) != n + 1 or offsets[-1] != len(meta.int_list(ids)):
            raise ValueError(
                f"sample index={self.index}: {len(offsets)} top-p offsets ending at {offsets[-1] if offsets else None} "
                f"for response_length {n} and {len(meta.int_list(ids))} kept token ids"
            )


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
