"""A `/generate` body checked as SGLang checks it, then turned into the engine's `Request`.

`parse_generate` decodes and checks a raw body (off the event loop: tokenizing a prompt of many
megabytes takes seconds); `check_generate_body` runs SGLang's own schema (`schema`) and then
`build_request`, the checks SGLang makes past its schema (no streaming, ids inside the
vocabulary, prompt plus `max_new_tokens` within the context) and the ones this engine adds for what it
cannot do. The HTTP side (`server`) and the OpenAI endpoints (`openai_api`) share them.
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

from slime_wf.engine_server.sampling import InvalidRequest, Request, SamplingParams
from slime_wf.engine_server.schema import generate_request_error

if TYPE_CHECKING:
    from slime_wf.engine_server.engine import LocalEngine

_UNSUPPORTED_TOP_LEVEL = (
    "image_data",
    "video_data",
    "audio_data",
    "lora_path",
    "session_params",
    "custom_logit_processor",
)


class ContractViolation(ValueError):
    """The body breaks SGLang's schema; the text is SGLang's own."""


def parse_generate(raw: bytes, engine: LocalEngine) -> Request | list[Request]:
    """Decode, schema-check and tokenize a `/generate` body: one `Request`, or a list of them for a
    batched body (`split_batch`). Runs off the event loop: a prompt of many megabytes takes seconds to
    tokenize, and `/health` must answer meanwhile."""
    if not raw:
        body: Any = {}
    else:
        try:
            body = json.loads(raw)
        except json.JSONDecodeError as err:
            raise InvalidRequest(f"the request body of /generate is not valid JSON: {err}") from err
    _check_contract(body)
    items = split_batch(body)
    if items is None:
        return build_request(body, engine)
    return [build_request(item, engine) for item in items]


# Fields of a batched body that may hold one value per prompt (a list) or one value for all.
_PER_PROMPT = ("sampling_params", "rid", "return_logprob", "top_logprobs_num", "logprob_start_len")


def split_batch(body: Any) -> list[dict[str, Any]] | None:
    """A batched `/generate` body (SGLang's `text` or `input_ids` given as a list of prompts) as one body
    per prompt, in order; None for a body of one prompt.

    As in SGLang, each per-prompt field is either one value for every prompt or a list of one value per
    prompt (`sampling_params`, `rid`, `return_logprob`, `top_logprobs_num`, `logprob_start_len`);
    the other fields are shared. The answer is a list of the prompts' responses, in the same order."""
    if not isinstance(body, dict):
        return None
    text, input_ids = body.get("text"), body.get("input_ids")
    if isinstance(text, list) and input_ids is None:
        key, prompts = "text", text
    elif isinstance(input_ids, list) and input_ids and isinstance(input_ids[0], list) and text is None:
        key, prompts = "input_ids", input_ids
    else:
        return None
    if not prompts:
        raise InvalidRequest(f"{key} is an empty batch: give at least one prompt")
    items = [dict(body, **{key: prompt}) for prompt in prompts]
    for field in _PER_PROMPT:
        value = body.get(field)
        if not isinstance(value, list):
            continue
        if len(value) != len(prompts):
            raise InvalidRequest(
                f"{field} has {len(value)} entries for a batch of {len(prompts)} prompts: give one value "
                "for all of them or one per prompt"
            )
        for item, one in zip(items, value, strict=True):
            item[field] = one
    return items


def check_generate_body(body: Any, engine: LocalEngine) -> Request:
    """A decoded `/generate` body checked with SGLang's schema, then turned into an engine `Request`."""
    _check_contract(body)
    return build_request(body, engine)


def _check_contract(body: Any) -> None:
    """Raise `ContractViolation` with SGLang's own text when `body` breaks SGLang's schema."""
    contract_error = generate_request_error(body)
    if contract_error is not None:
        raise ContractViolation(contract_error)


def build_request(body: Any, engine: LocalEngine) -> Request:
    """Check a `/generate` body (already past SGLang's schema) and turn it into an engine `Request`."""
    if not isinstance(body, dict):
        raise InvalidRequest("the /generate body must be a JSON object")
    text, input_ids = body.get("text"), body.get("input_ids")
    if (text is None) == (input_ids is None):
        raise InvalidRequest("Either text or input_ids should be provided, not both or neither.")
    if isinstance(text, list) or (
        isinstance(input_ids, list) and input_ids and isinstance(input_ids[0], list)
    ):
        raise InvalidRequest("a list of prompts is taken by /generate only (a batched request)")
    if body.get("stream"):
        raise InvalidRequest("stream=true is not supported by the local engine; send stream=false")
    for key in _UNSUPPORTED_TOP_LEVEL:
        if body.get(key) is not None:
            raise InvalidRequest(f"{key} is not supported by the local engine")
    top_num = body.get("top_logprobs_num") or 0
    if not isinstance(top_num, int) or isinstance(top_num, bool) or top_num < 0:
        raise InvalidRequest(f"top_logprobs_num must be a non-negative integer, got {top_num!r}")
    rid = body.get("rid")
    if isinstance(rid, list):
        raise InvalidRequest(
            "rid must be a string for one prompt (a list of rids goes with a list of prompts)"
        )
    sampling = body.get("sampling_params")
    if sampling is not None and not isinstance(sampling, dict):
        raise InvalidRequest(
            "sampling_params must be one object for one prompt (a list goes with a list of prompts)"
        )
    params = SamplingParams.from_request(sampling, engine.vocab_size)
    if input_ids is None:
        if not isinstance(text, str):
            raise InvalidRequest("text must be a string")
        assert (
            engine.tokenizer is not None
        )  # /generate takes requests only once the model loaded (_not_ready)
        input_ids = engine.tokenizer.encode(text)
    if not isinstance(input_ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in input_ids
    ):
        raise InvalidRequest("input_ids must be a list of integers")
    if not input_ids:
        raise InvalidRequest("the prompt is empty: give at least one token")
    bad = [t for t in input_ids if not 0 <= t < engine.vocab_size]
    if bad:
        raise InvalidRequest(
            f"input_ids contain {len(bad)} token id(s) outside the vocabulary [0, {engine.vocab_size}), e.g. {bad[:5]}"
        )
    n, ctx = len(input_ids), engine.context_length
    if n >= ctx:
        raise InvalidRequest(
            f"The input ({n} tokens) is longer than the model's context length ({ctx} tokens)."
        )
    if n + params.max_new_tokens > ctx:
        raise InvalidRequest(
            f"Requested token count exceeds the model's maximum context length of {ctx} tokens. You requested "
            f"a total of {n + params.max_new_tokens} tokens: {n} tokens from the input messages and "
            f"{params.max_new_tokens} tokens for the completion. Reduce max_new_tokens or the prompt."
        )
    return Request(
        rid=rid if rid is not None else uuid.uuid4().hex,
        input_ids=list(input_ids),
        params=params,
        return_logprob=bool(body.get("return_logprob")),
        return_text_in_logprobs=bool(body.get("return_text_in_logprobs")),
        top_logprobs_num=top_num,
    )
