"""Prompt datasets: JSONL or Parquet files, local or on `s3://`, turned into `Sample`s.

Rows are read with the campaign's `input_key`, `label_key` and `metadata_key`. A malformed row
fails with the file and line (JSONL) or row number (Parquet); with `skip_bad_rows` it is
skipped and counted instead. Prompts over `rollout_max_prompt_len` tokens are dropped and
counted. Nothing is dropped without a count in `Dataset.stats`.

A path may end in `@[start:end]` to use a slice of the rows, as in slime.
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass, field
from typing import Any

from slime_wf.store import filesystem_for
from slime_wf.types import Sample

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """A dataset row or file that cannot be used; the message names the file and row."""


@dataclass
class DatasetStats:
    rows: int = 0
    kept: int = 0
    skipped_bad_rows: int = 0
    dropped_too_long: int = 0
    bad_row_examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "kept": self.kept,
            "skipped_bad_rows": self.skipped_bad_rows,
            "dropped_too_long": self.dropped_too_long,
        }


_SLICE = re.compile(r"^(?P<path>.*)@\[(?P<start>-?\d*):(?P<end>-?\d*)\]$")


def _split_slice(path: str) -> tuple[str, slice | None]:
    m = _SLICE.match(path)
    if not m:
        return path, None
    to_int = lambda s: int(s) if s else None  # noqa: E731
    return m.group("path"), slice(to_int(m.group("start")), to_int(m.group("end")))


def _read_rows(path: str, *, s3_endpoint_url=None, s3_region=None):
    """Yield (location, row-or-error) for every row; location is 'file:line' or 'file row N'."""
    fs, fs_path = filesystem_for(path, s3_endpoint_url=s3_endpoint_url, s3_region=s3_region)
    if not fs.exists(fs_path):
        raise DataError(f"dataset {path} does not exist")
    if path.endswith(".jsonl") or path.endswith(".json"):
        with fs.open(fs_path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as err:
                    yield f"{path}:{lineno}", DataError(f"malformed JSON ({err.msg} at column {err.colno})")
    elif path.endswith(".parquet"):
        import pyarrow.parquet as pq

        with fs.open(fs_path, "rb") as f:
            table = pq.read_table(f)
        for i, row in enumerate(table.to_pylist()):
            yield f"{path} row {i}", row
    else:
        raise DataError(f"dataset {path}: unsupported format; use .jsonl or .parquet")


def load_tokenizer(hf_checkpoint: str):
    """The tokenizer of a local Hugging Face checkpoint directory."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(hf_checkpoint)
    except Exception as err:
        raise DataError(f"cannot load the tokenizer of {hf_checkpoint}: {err}") from err


class Dataset:
    """All prompts of one file as `Sample`s, with a deterministic per-epoch shuffle."""

    def __init__(
        self,
        path: str,
        *,
        tokenizer: Any = None,
        max_length: int | None = None,
        prompt_key: str = "prompt",
        label_key: str | None = "label",
        metadata_key: str | None = "metadata",
        apply_chat_template: bool = False,
        apply_chat_template_kwargs: dict[str, Any] | None = None,
        seed: int = 42,
        skip_bad_rows: bool = False,
        s3_endpoint_url: str | None = None,
        s3_region: str | None = None,
    ):
        if (apply_chat_template or max_length is not None) and tokenizer is None:
            raise DataError(
                f"dataset {path}: apply_chat_template and rollout_max_prompt_len need a tokenizer; "
                "set model.hf_checkpoint"
            )
        self.path = path
        self.seed = seed
        self.stats = DatasetStats()
        file_path, row_slice = _split_slice(path)
        rows = list(_read_rows(file_path, s3_endpoint_url=s3_endpoint_url, s3_region=s3_region))
        if row_slice is not None:
            rows = rows[row_slice]

        prompts: list[tuple[str, Any]] = []
        samples: list[Sample] = []
        for location, row in rows:
            self.stats.rows += 1
            try:
                if isinstance(row, Exception):
                    raise row
                sample = self._row_to_sample(row, prompt_key, label_key, metadata_key)
                if apply_chat_template:
                    sample.prompt = _render_chat(tokenizer, sample.prompt, apply_chat_template_kwargs or {})
            except DataError as err:
                message = f"{location}: {err}"
                if not skip_bad_rows:
                    raise DataError(f"{message}. Fix the row, or set data.skip_bad_rows=true to skip such rows") from None
                self.stats.skipped_bad_rows += 1
                if len(self.stats.bad_row_examples) < 5:
                    self.stats.bad_row_examples.append(message)
                continue
            prompts.append((location, sample.prompt))
            samples.append(sample)

        if max_length is not None and samples:
            texts = [
                p if isinstance(p, str) else _render_chat(tokenizer, p, apply_chat_template_kwargs or {})
                for _, p in prompts
            ]
            lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
            kept = [s for s, n in zip(samples, lengths, strict=True) if n <= max_length]
            self.stats.dropped_too_long = len(samples) - len(kept)
            samples = kept

        self.origin_samples = samples
        self.samples = samples
        self.stats.kept = len(samples)
        self.epoch_id = -1
        if self.stats.skipped_bad_rows:
            logger.warning(
                "dataset %s: skipped %d bad row(s), e.g. %s",
                path,
                self.stats.skipped_bad_rows,
                "; ".join(self.stats.bad_row_examples[:2]),
            )
        if self.stats.dropped_too_long:
            logger.warning(
                "dataset %s: dropped %d prompt(s) longer than rollout_max_prompt_len=%d tokens",
                path,
                self.stats.dropped_too_long,
                max_length,
            )
        if not samples:
            raise DataError(f"dataset {path} has no usable prompts ({self.stats.as_dict()})")

    @staticmethod
    def _row_to_sample(row: Any, prompt_key: str, label_key: str | None, metadata_key: str | None) -> Sample:
        if not isinstance(row, dict):
            raise DataError(f"row is a {type(row).__name__}, expected a JSON object")
        if prompt_key not in row:
            raise DataError(f"missing prompt key {prompt_key!r} (row keys: {sorted(row)}); see data.input_key")
        prompt = row[prompt_key]
        if not _is_prompt(prompt):
            raise DataError(
                f"prompt {prompt_key!r} must be a string or a list of {{role, content}} messages, "
                f"got {type(prompt).__name__}"
            )
        label = None
        if label_key is not None:
            if label_key not in row or row[label_key] is None:
                raise DataError(
                    f"missing label key {label_key!r} (row keys: {sorted(row)}); see data.label_key "
                    "(null if the dataset has no labels)"
                )
            label = row[label_key]
        metadata: Any = {}
        if metadata_key is not None and row.get(metadata_key) is not None:
            metadata = row[metadata_key]
            if isinstance(metadata, str):
                try:
                    metadata = json.loads(metadata)
                except json.JSONDecodeError:
                    raise DataError(f"metadata {metadata_key!r} is a string but not JSON") from None
            if not isinstance(metadata, dict):
                raise DataError(f"metadata {metadata_key!r} must be a mapping, got {type(metadata).__name__}")
        return Sample(prompt=prompt, label=label, metadata=metadata)

    def shuffle(self, epoch_id: int) -> None:
        """Order the prompts for `epoch_id`: a permutation seeded by seed + epoch, as slime does."""
        if self.epoch_id == epoch_id:
            return
        order = list(range(len(self.origin_samples)))
        random.Random(self.seed + epoch_id).shuffle(order)
        self.samples = [self.origin_samples[i] for i in order]
        self.epoch_id = epoch_id

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> Sample:
        return self.samples[idx]


def _is_prompt(prompt: Any) -> bool:
    if isinstance(prompt, str):
        return True
    return (
        isinstance(prompt, list)
        and len(prompt) > 0
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt)
    )


def _render_chat(tokenizer: Any, prompt: Any, kwargs: dict[str, Any]) -> str:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    except Exception as err:
        raise DataError(f"apply_chat_template failed: {err}") from err
