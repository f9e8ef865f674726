"""Per-request sampling with SGLang's semantics, for the local engine.

- temperature 0 means greedy, which SGLang rewrites to temperature 1 with top_k 1;
- returned log-probs are log-softmax of logits / temperature (raw logits when greedy), taken
  before top-k / top-p / min-p truncation (`srt/layers/sampler.py`);
- truncation order is top-k, then top-p, then min-p on the sorted probabilities, as in SGLang's
  torch-native sampler;
- `sampling_seed` draws from a per-request `torch.Generator` (`Uniforms`), so a request is
  reproducible whatever else is in the batch (given the same logits);
- penalties, `min_new_tokens` and `logit_bias` change the logits before all of this
  (`penalties`), so returned log-probs include them, as in SGLang;
- `custom_params` is opaque data, accepted and not read (SGLang hands it to custom logit
  processors, which this engine does not run).

`Request` is a validated request with its `SamplingParams`: what the scheduler (`engine`)
runs and the response builder (`response`) answers.
"""

from __future__ import annotations

import concurrent.futures
import math
import re
import re._parser as re_parser  # type: ignore[import-not-found]  # what SGLang parses stop_regex with
import time
from dataclasses import dataclass, field
from typing import Any

import torch

TOP_K_ALL = 1 << 30
_UNBOUNDED = 1 << 30  # a stop_regex with an open repeat: search the whole output

# What SGLang accepts and this engine cannot do: any value but the default is refused with the reason.
_GRAMMAR = "constrained decoding needs a grammar backend (xgrammar), which the local engine does not have"
_UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "json_schema": (None, _GRAMMAR),
    "regex": (None, _GRAMMAR),
    "ebnf": (None, _GRAMMAR),
    "structural_tag": (None, _GRAMMAR),
    "choice": ([], _GRAMMAR),
    "beam_width": (None, "the local engine does not implement beam search"),
    "watermark": (None, "the local engine does not implement output watermarking"),
}


class InvalidRequest(ValueError):
    """A request the engine refuses (HTTP 400); the text names the field and the fix."""


@dataclass
class Request:
    """A validated `/generate` request, as the engine's scheduler sees it; its answer arrives on `future`."""

    rid: str
    input_ids: list[int]
    params: SamplingParams
    return_logprob: bool = False
    return_text_in_logprobs: bool = False
    top_logprobs_num: int = 0
    arrival: float = field(default_factory=time.perf_counter)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = TOP_K_ALL
    min_p: float = 0.0
    min_new_tokens: int = 0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    custom_params: dict[str, Any] | None = None
    stop: list[str] = field(default_factory=list)
    stop_regex: list[str] = field(default_factory=list)
    stop_regex_tail: int = 0  # output tokens to decode when searching for stop_regex
    stop_token_ids: set[int] = field(default_factory=set)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    sampling_seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.top_k == 1

    @classmethod
    def from_request(cls, raw: dict[str, Any] | None, vocab_size: int) -> SamplingParams:
        """Parse and check `sampling_params` as SGLang's `SamplingParams.verify` does."""
        raw = dict(raw or {})
        for key, (default, reason) in _UNSUPPORTED.items():
            value = raw.get(key)
            if value is not None and value != default:
                raise InvalidRequest(
                    f"sampling_params.{key}={value!r} is refused: {reason}; leave it unset "
                    f"({default!r}) or use an SGLang server"
                )
        n = raw.get("n")
        if n is not None and n != 1:
            raise InvalidRequest(
                f"sampling_params.n={n} is not supported: the local engine generates one sample per "
                "request; send n separate requests (each with its own rid) instead"
            )

        def get(key, default):
            value = raw.get(key)
            if value is None:
                return default
            kind = type(default)
            if kind is bool:
                ok = isinstance(value, bool)
            elif kind in (int, float):
                ok = isinstance(value, int if kind is int else (int, float)) and not isinstance(value, bool)
            else:
                ok = isinstance(value, (str, list))
            if not ok:
                raise InvalidRequest(
                    f"sampling_params.{key}={value!r} has the wrong type; expected {kind.__name__}"
                )
            return value

        stop = get("stop", [])
        stop = [stop] if isinstance(stop, str) else list(stop)
        if len(stop) > 32:
            raise InvalidRequest(f"at most 32 stop strings are allowed, got {len(stop)}")
        if any(s == "" for s in stop):
            raise InvalidRequest("sampling_params.stop contains an empty string; remove it")
        stop_regex = get("stop_regex", [])
        stop_regex = [stop_regex] if isinstance(stop_regex, str) else list(stop_regex)
        params = cls(
            max_new_tokens=int(get("max_new_tokens", 128)),
            temperature=float(get("temperature", 1.0)),
            top_p=float(get("top_p", 1.0)),
            top_k=int(get("top_k", -1)),
            min_p=float(get("min_p", 0.0)),
            min_new_tokens=int(get("min_new_tokens", 0)),
            frequency_penalty=float(get("frequency_penalty", 0.0)),
            presence_penalty=float(get("presence_penalty", 0.0)),
            repetition_penalty=float(get("repetition_penalty", 1.0)),
            logit_bias=_logit_bias(raw.get("logit_bias"), vocab_size),
            custom_params=_custom_params(raw.get("custom_params")),
            stop=stop,
            stop_regex=stop_regex,
            stop_regex_tail=_stop_regex_tail(stop_regex),
            stop_token_ids={int(t) for t in get("stop_token_ids", [])},
            ignore_eos=bool(get("ignore_eos", False)),
            skip_special_tokens=bool(get("skip_special_tokens", True)),
            spaces_between_special_tokens=bool(get("spaces_between_special_tokens", True)),
            no_stop_trim=bool(get("no_stop_trim", False)),
            sampling_seed=None if raw.get("sampling_seed") is None else int(get("sampling_seed", 0)),
        )
        params._verify(vocab_size)
        if 0 <= params.temperature < 1e-6:
            params.temperature, params.top_k = 1.0, 1
        if params.top_k == -1:
            params.top_k = TOP_K_ALL
        return params

    def _verify(self, vocab_size: int) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0.0:
            raise InvalidRequest(f"temperature must be a non-negative finite number, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequest(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.top_k < 1 and self.top_k != -1:
            raise InvalidRequest(f"top_k must be -1 (disable) or at least 1, got {self.top_k}.")
        if self.max_new_tokens < 0:
            raise InvalidRequest(f"max_new_tokens must be at least 0, got {self.max_new_tokens}.")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise InvalidRequest(
                f"min_new_tokens must be in [0, max_new_tokens({self.max_new_tokens})], got {self.min_new_tokens}."
            )
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidRequest(f"{name} must be in [-2, 2], got {getattr(self, name)}.")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise InvalidRequest(
                f"repetition_penalty must be in (0, 2] (1.0 = no penalty), got {self.repetition_penalty}."
            )
        bad = sorted(t for t in self.stop_token_ids if not 0 <= t < vocab_size)
        if bad:
            raise InvalidRequest(f"stop_token_ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
        if self.sampling_seed is not None and not -(2**63) <= self.sampling_seed <= 2**63 - 1:
            raise InvalidRequest(f"sampling_seed must be in [-2**63, 2**63 - 1], got {self.sampling_seed}.")

    def make_uniforms(self) -> Uniforms | None:
        """The request's own stream of draws when it has a `sampling_seed` (None: the engine's stream)."""
        if self.sampling_seed is None:
            return None
        # torch seeds are unsigned 64-bit; fold negative seeds into that range.
        return Uniforms(torch.Generator().manual_seed(self.sampling_seed % (1 << 64)))

    def truncates(self, vocab_size: int) -> bool:
        """Whether top-k, top-p or min-p can drop a token (top_k at or past the vocabulary drops none)."""
        return self.top_k < vocab_size or self.top_p < 1.0 or self.min_p > 0.0


class Uniforms:
    """A stream of uniform draws in [0, 1) from one `torch.Generator`, drawn a block at a time.

    A sampled token costs one draw; drawing blocks keeps the per-row cost of a decode step to a list
    lookup instead of a tensor call per row. The sequence is fixed by the generator's seed, so a seeded
    request samples the same tokens whatever else is in the batch (given the same logits)."""

    BLOCK = 64

    def __init__(self, generator: torch.Generator):
        self._generator = generator
        self._block: list[float] = []
        self._next = 0

    def next(self) -> float:
        if self._next == len(self._block):
            self._block = torch.rand(self.BLOCK, generator=self._generator, dtype=torch.float64).tolist()
            self._next = 0
        value = self._block[self._next]
        self._next += 1
        return value


def _logit_bias(raw: Any, vocab_size: int) -> dict[int, float]:
    """SGLang's `logit_bias`: token id (a JSON key, so a string) -> bias added to that token's logit."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidRequest(f"sampling_params.logit_bias must be an object of token id -> bias, got {raw!r}")
    bias: dict[int, float] = {}
    for key, value in raw.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise InvalidRequest(f"sampling_params.logit_bias key {key!r} is not a token id") from None
        if not 0 <= token < vocab_size:
            raise InvalidRequest(f"logit_bias must has keys in [0, {vocab_size - 1}], got {key}.")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            raise InvalidRequest(f"sampling_params.logit_bias[{key!r}]={value!r} must be a number")
        bias[token] = float(value)  # "1" and "01" name one token: the last wins, as in SGLang
    return bias


def _stop_regex_tail(patterns: list[str]) -> int:
    """SGLang's checks of `stop_regex` and the tail of the output (in tokens) a match can span: the longest
    text a pattern can match (one token per character, at worst), plus one."""
    if len(patterns) > 32:
        raise InvalidRequest(f"at most 32 stop_regex patterns are allowed, got {len(patterns)}")
    tail = 0
    for pattern in patterns:
        if len(pattern.encode("utf-8")) > 256:
            raise InvalidRequest(f"stop_regex is {len(pattern.encode())} bytes, over the 256-byte limit")
        try:
            tail = max(tail, _max_match_length(re_parser.parse(pattern)) + 1)
        except (re.error, RecursionError) as err:
            raise InvalidRequest(f"stop_regex {pattern!r} is not a valid regular expression: {err}") from None
    return min(tail, _UNBOUNDED)


def _max_match_length(parsed) -> int:
    """The longest text a parsed pattern matches (`_UNBOUNDED` for open repeats), SGLang's `get_max_seq_length`."""
    total = 0
    for op, value in parsed:
        if op in (re_parser.LITERAL, re_parser.IN, re_parser.ANY):
            total += 1
        elif op == re_parser.SUBPATTERN:
            total += _max_match_length(value[3])
        elif op == re_parser.BRANCH:
            total += max(_max_match_length(branch) for branch in value[1])
        elif op in (re_parser.MAX_REPEAT, re_parser.MIN_REPEAT):
            _, most, inner = value
            total += _UNBOUNDED if most == re_parser.MAXREPEAT else most * _max_match_length(inner)
        elif op != re_parser.AT:  # anchors match no text
            total += _UNBOUNDED
    return total


def _custom_params(raw: Any) -> dict[str, Any] | None:
    if raw is not None and not isinstance(raw, dict):
        raise InvalidRequest(f"sampling_params.custom_params must be an object, got {raw!r}")
    return raw


def _truncate_(probs: torch.Tensor, top_k: int, top_p: float, min_p: float) -> None:
    """Zero, in place, the probabilities that top-k, then top-p, then min-p drop (one row of a request
    whose `SamplingParams.truncates`)."""
    sorted_probs, ids = torch.sort(probs, descending=True)
    drop = torch.zeros_like(sorted_probs, dtype=torch.bool)
    drop[top_k:] = True
    if top_p < 1.0:
        drop |= torch.cumsum(sorted_probs, 0) - sorted_probs > top_p
    if min_p > 0.0:
        drop |= sorted_probs < sorted_probs[0] * min_p
    probs[ids[drop]] = 0.0


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    uniforms: list[Uniforms],
    top_nums: list[int] | None = None,
) -> tuple[list[int], list[float], list[list[tuple[float, int]] | None]]:
    """Next token, its log-prob and, for rows with `top_nums[row] > 0`, that many top (log-prob,
    token) pairs of the same distribution, for each row of `logits` ([rows, vocab], float32).

    Sampled rows take one draw from their stream in `uniforms` and invert the cumulative distribution
    (batched), which costs far less than a `torch.multinomial` call per row.
    """
    temperatures = [p.temperature for p in params]
    if min(temperatures) == max(temperatures):
        scaled = logits / temperatures[0]
    else:
        scaled = logits / torch.tensor(temperatures, dtype=logits.dtype)[:, None]
    logprobs = torch.log_softmax(scaled, dim=-1)
    tokens = torch.argmax(logits, dim=-1)
    sampled = [row for row, p in enumerate(params) if not p.greedy]
    if sampled:
        every_row = len(sampled) == len(params)
        index = None if every_row else torch.tensor(sampled)
        probs = (logprobs if index is None else logprobs.index_select(0, index)).exp()
        for i, row in enumerate(sampled):
            p = params[row]
            if p.truncates(logits.shape[-1]):
                _truncate_(probs[i], p.top_k, p.top_p, p.min_p)
        draws = torch.tensor([uniforms[row].next() for row in sampled], dtype=torch.float64)
        cdf = probs.double().cumsum(-1)
        target = (draws * cdf[:, -1])[:, None]
        picks = torch.searchsorted(cdf, target, right=True)[:, 0].clamp(max=logits.shape[-1] - 1)
        if index is None:
            tokens = picks
        else:
            tokens[index] = picks
    floor = torch.finfo(logprobs.dtype).min
    chosen = logprobs.gather(1, tokens[:, None])[:, 0].clamp(min=floor)
    tops: list[list[tuple[float, int]] | None] = [None] * len(params)
    if top_nums and any(top_nums):
        for row, num in enumerate(top_nums):
            if num > 0:
                values, ids = logprobs[row].topk(min(num, logprobs.shape[-1]))
                tops[row] = list(zip(values.clamp(min=floor).tolist(), ids.tolist(), strict=True))
    return tokens.tolist(), chosen.tolist(), tops
