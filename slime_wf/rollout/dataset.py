"""Prompt datasets: JSONL or Parquet files, local or on `s3://`, turned into `Sample`s.

Rows are read with the campaign's `input_key`, `label_key` and `metadata_key`. A bad row fails
with the file and line (JSONL) or row number (Parquet); with `skip_bad_rows` it is skipped and
counted instead. Bad rows are malformed ones, empty prompts, and prompts whose tokens plus
`rollout_max_response_len` exceed the engine's context length: the engine would refuse them
on every retry and every resume. Prompts over `rollout_max_prompt_len` tokens are dropped and
counted. Nothing is dropped without a count in `Dataset.stats`.

A path may end in `@[start:end]` to use a slice of the rows, as in slime.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from dataclasses import dataclass, field
from typing import Any

from slime_wf.checkpoint import CheckpointError
from slime_wf.checkpoint.layout import hf_config
from slime_wf.store import filesystem_for
from slime_wf.types import Sample

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """A dataset row or file that cannot be used; the message names the file and row."""


@dataclass
class DatasetStats:
    rows: int = 0
    kept: int = 0
    skipped_bad_rows: int = 0  # all skipped rows, the two kinds below included
    skipped_empty_prompts: int = 0
    skipped_over_context: int = 0
    dropped_too_long: int = 0
    bad_row_examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "kept": self.kept,
            "skipped_bad_rows": self.skipped_bad_rows,
            "skipped_empty_prompts": self.skipped_empty_prompts,
            "skipped_over_context": self.skipped_over_context,
            "dropped_too_long": self.dropped_too_long,
        }


class EmptyPrompt(DataError):
    """A prompt with nothing to generate from."""


class PromptOverContext(DataError):
    """A prompt that leaves no room for a full response in the engine's context."""


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
        # Binary lines break at b"\n" only: text mode would also break at a raw "\r", and
        # str.splitlines() at U+0085, U+2028, U+2029 and more, all of which web text holds.
        with fs.open(fs_path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                location = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as err:
                    yield location, DataError(f"not valid UTF-8 (byte {err.start + 1}: {err.reason})")
                    continue
                if not line.strip(" \t\r\n"):
                    continue
                try:
                    yield location, json.loads(line)
                except json.JSONDecodeError as err:
                    yield location, DataError(f"malformed JSON ({err.msg} at column {err.colno})")
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


def checkpoint_context_length(hf_checkpoint: str) -> int | None:
    """`max_position_embeddings` of a local checkpoint's text model, the context length the
    local engine enforces and SGLang derives by default; None without a local config.json or
    without that field."""
    config_file = os.path.join(hf_checkpoint, "config.json")
    if not os.path.isfile(config_file):
        return None
    try:
        from transformers import AutoConfig

        value = getattr(
            AutoConfig.from_pretrained(hf_checkpoint).get_text_config(), "max_position_embeddings", None
        )
    except Exception:  # a model type this transformers does not know: read the file itself
        try:
            raw = hf_config(hf_checkpoint) or {}
        except (OSError, CheckpointError) as err:
            raise DataError(f"cannot read {config_file}: {err}") from err
        nested = raw.get("text_config")
        text_config: dict = nested if isinstance(nested, dict) else raw
        value = text_config.get("max_position_embeddings", raw.get("max_position_embeddings"))
    return int(value) if value else None


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
        context_length: int | None = None,
        max_response_len: int = 0,
        s3_endpoint_url: str | None = None,
        s3_region: str | None = None,
    ):
        """`context_length`: the engine's limit on prompt plus response tokens (None: unchecked);
        `max_response_len`: the response tokens each prompt must leave room for."""
        if (
            apply_chat_template or max_length is not None or context_length is not None
        ) and tokenizer is None:
            raise DataError(
                f"dataset {path}: apply_chat_template, rollout_max_prompt_len and the context-length check need a "
                "tokenizer; set model.hf_checkpoint"
            )
        if context_length is not None and max_response_len >= context_length:
            raise DataError(
                f"dataset {path}: rollout_max_response_len={max_response_len} leaves no room for a prompt in the "
                f"engine's context length of {context_length} tokens; lower rollout.rollout_max_response_len"
            )
        self.path = path
        self.seed = seed
        self.stats = DatasetStats()
        file_path, row_slice = _split_slice(path)
        rows = list(_read_rows(file_path, s3_endpoint_url=s3_endpoint_url, s3_region=s3_region))
        if row_slice is not None:
            rows = rows[row_slice]

        chat_kwargs = apply_chat_template_kwargs or {}
        count_tokens = max_length is not None or context_length is not None
        parsed: list[tuple[str, Sample, str | None]] = []  # (location, sample, text the engine gets)
        for location, row in rows:
            self.stats.rows += 1
            try:
                if isinstance(row, Exception):
                    raise row
                sample = self._row_to_sample(row, prompt_key, label_key, metadata_key)
                if apply_chat_template:
                    sample.prompt = _render_chat(tokenizer, sample.prompt, chat_kwargs)
                text: str | None = None
                if count_tokens:  # what generate.prompt_token_ids sends: messages rendered with the template
                    prompt = sample.prompt
                    text = prompt if isinstance(prompt, str) else _render_chat(tokenizer, prompt, chat_kwargs)
            except DataError as err:
                self._bad_row(location, err, skip_bad_rows)
                continue
            parsed.append((location, sample, text))

        samples: list[Sample] = []
        lengths: list[int | None]
        if count_tokens and parsed:
            lengths = [
                len(ids)
                for ids in tokenizer([t for _, _, t in parsed], add_special_tokens=False)["input_ids"]
            ]
        else:
            lengths = [None] * len(parsed)
        for (location, sample, _), n in zip(parsed, lengths, strict=True):
            if n is not None:
                if max_length is not None and n > max_length:
                    self.stats.dropped_too_long += 1
                    continue
                try:
                    if n == 0:
                        raise EmptyPrompt("the prompt has no tokens; the engine cannot generate from it")
                    if context_length is not None and n + max_response_len > context_length:
                        raise PromptOverContext(
                            f"the prompt has {n} tokens; with rollout_max_response_len={max_response_len} that is "
                            f"{n + max_response_len}, over the engine's context length of {context_length} tokens, "
                            "so the engine would refuse it. Shorten the prompt, lower rollout.rollout_max_response_len, "
                            f"or set data.rollout_max_prompt_len={context_length - max_response_len} to drop such prompts"
                        )
                except DataError as err:
                    self._bad_row(location, err, skip_bad_rows)
                    continue
            samples.append(sample)

        self.origin_samples = samples
        self.samples = samples
        self.stats.kept = len(samples)
        self.epoch_id = -1
        if self.stats.skipped_bad_rows:
            logger.warning(
                "dataset %s: skipped %d bad row(s) (%d empty prompt(s), %d over the engine's context), e.g. %s",
                path,
                self.stats.skipped_bad_rows,
                self.stats.skipped_empty_prompts,
                self.stats.skipped_over_context,
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

    def _bad_row(self, location: str, err: DataError, skip_bad_rows: bool) -> None:
        message = f"{location}: {err}"
        if not skip_bad_rows:
            raise DataError(
                f"{message}. Fix the row, or set data.skip_bad_rows=true to skip such rows"
            ) from None
        self.stats.skipped_bad_rows += 1
        if isinstance(err, EmptyPrompt):
            self.stats.skipped_empty_prompts += 1
        elif isinstance(err, PromptOverContext):
            self.stats.skipped_over_context += 1
        if len(self.stats.bad_row_examples) < 5:
            self.stats.bad_row_examples.append(message)

    @staticmethod
    def _row_to_sample(row: Any, prompt_key: str, label_key: str | None, metadata_key: str | None) -> Sample:
        if not isinstance(row, dict):
            raise DataError(f"row is a {type(row).__name__}, expected a JSON object")
        if prompt_key not in row:
            raise DataError(
                f"missing prompt key {prompt_key!r} (row keys: {sorted(row)}); see data.input_key"
            )
        prompt = row[prompt_key]
        if isinstance(prompt, list) and not prompt:
            raise EmptyPrompt(f"prompt {prompt_key!r} is an empty list of messages")
        if not _is_prompt(prompt):
            raise DataError(
                f"prompt {prompt_key!r} must be a string or a list of {{role, content}} messages, "
                f"got {type(prompt).__name__}"
            )
        if _is_blank(prompt):
            raise EmptyPrompt(
                f"prompt {prompt_key!r} is empty or whitespace only; the engine cannot generate from it"
            )
        _check_encodable(prompt, prompt_key)
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


def _is_blank(prompt: Any) -> bool:
    if isinstance(prompt, str):
        return not prompt.strip()
    # content that is not a string (a list of parts, say) is left to the chat template
    return all(isinstance(m["content"], str) and not m["content"].strip() for m in prompt)


def _render_chat(tokenizer: Any, prompt: Any, kwargs: dict[str, Any]) -> str:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    except Exception as err:
        raise DataError(f"apply_chat_template failed: {err}") from err


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_encodable(prompt: Any, prompt_key: str) -> None:
    """A JSON escape such as "\\ud800" without its pair decodes to a lone surrogate: not Unicode text,
    so no tokenizer can encode it and the row would fail at every rollout."""
    texts = (
        [prompt]
        if isinstance(prompt, str)
        else [str(m.get("content", "")) for m in prompt if isinstance(m, dict)]
    )
    for text in texts:
        found = _LONE_SURROGATE.search(text)
        if found:
            raise DataError(
                f"prompt {prompt_key!r} holds a lone surrogate U+{ord(found.group()):04X} at character {found.start()} "
                "(an unpaired \\ud800-\\udfff escape): it is not valid Unicode and cannot be tokenized; fix the text"
            )
