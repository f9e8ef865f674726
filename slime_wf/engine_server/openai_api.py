"""OpenAI-compatible endpoints with the shapes SGLang 0.5.23 serves (`srt/entrypoints/openai/`):
`POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`.

Each request becomes one `/generate` request per choice, checked like any `/generate` body, so
sampling parameters mean what they mean there (SGLang's mapping: `max_tokens` -> `max_new_tokens`,
`min_tokens` -> `min_new_tokens`, `seed` -> `sampling_seed`, and the SGLang extras `top_k`,
`min_p`, `repetition_penalty`, `stop_token_ids`, `ignore_eos`, `custom_params`, ... pass through).
`n > 1` and lists of prompts fan out into separate requests (choice `i * n + j` is sample `j` of
prompt `i`). Chat renders `messages` (and `tools`, `chat_template_kwargs`) with the tokenizer's
chat template; unset `temperature`, `top_p`, `top_k`, `min_p` and `repetition_penalty` come from
the checkpoint's `generation_config.json`, as SGLang's default `--sampling-defaults model` does.
Tool calls and reasoning are not parsed out of the text (SGLang without `--tool-call-parser` /
`--reasoning-parser`). Completions `logprobs: N` and chat `logprobs` + `top_logprobs: N` return
the output tokens' log-probs with N alternatives; `echo` with `logprobs` needs prompt log-probs,
which this engine does not compute (400). With `stream: true` the answer arrives as server-sent
events in SGLang's chunk shapes, but in one piece when the request finishes. The shapes are built in
`openai_shapes`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from slime_wf.engine_server.engine import LocalEngine, QueueFull
from slime_wf.engine_server.openai_shapes import (
    chat_chunks,
    chat_response,
    chunk_base,
    completion_chunks,
    completion_response,
)
from slime_wf.engine_server.response import GenerationFailed

Prepare = Callable[[Any, LocalEngine], Any]
Run = Callable[[LocalEngine, Any], Awaitable[dict]]
BACKEND = web.AppKey("openai_backend", tuple)
DEFAULT_MODEL_NAME = "default"  # SGLang's default `model` of a request
# Sampling parameters chat takes from generation_config.json when the request leaves them unset.
_MODEL_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0}
# Request fields passed to `sampling_params` under the same name when present.
_PASSTHROUGH = (
    "top_k",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "stop_token_ids",
    "stop_regex",
    "regex",
    "ebnf",
    "json_schema",
    "no_stop_trim",
    "ignore_eos",
    "skip_special_tokens",
    "logit_bias",
    "custom_params",
    "watermark",
)
_UNSUPPORTED = ("lora_path", "session_params", "custom_logit_processor")


class BadRequest(ValueError):
    """An OpenAI request the server refuses with 400."""


def error_response(message: str, status: int = 400, err_type: str = "BadRequest") -> web.Response:
    """SGLang's OpenAI `ErrorResponse`."""
    body = {"object": "error", "message": message, "type": err_type, "param": None, "code": status}
    return web.json_response(body, status=status)


def add_routes(app: web.Application, engine: LocalEngine, prepare: Prepare, run: Run) -> None:
    """Serve the OpenAI endpoints on `app`; `prepare` checks a `/generate` body into an engine request
    and `run` answers it (the server's own, so both APIs follow one set of rules)."""
    app[BACKEND] = (engine, prepare, run)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)


async def models(request: web.Request) -> web.Response:
    engine = request.app[BACKEND][0]
    card = {
        "id": engine.model_path,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "sglang",
        "root": engine.model_path,
        "parent": None,
        "max_model_len": getattr(engine, "context_length", None),
    }
    return web.json_response({"object": "list", "data": [card]})


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, _completion_bodies, completion_response, completion_chunks)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, _chat_bodies, chat_response, chat_chunks)


async def _serve(request: web.Request, to_bodies, to_response, to_chunks) -> web.StreamResponse:
    engine, prepare, run = request.app[BACKEND]
    if not engine.ready.is_set() or engine.load_error is not None:
        return error_response("the model is not loaded", 503, "ServiceUnavailable")
    try:
        body = json.loads(await request.read())
        if not isinstance(body, dict):
            raise BadRequest(f"the request body of {request.path} must be a JSON object")
        for key in _UNSUPPORTED:
            if body.get(key) is not None:
                raise BadRequest(f"{key} is not supported by the local engine")
        gen_bodies = await asyncio.to_thread(to_bodies, body, engine)
        reqs = [await asyncio.to_thread(prepare, b, engine) for b in gen_bodies]
        tasks = [asyncio.ensure_future(run(engine, r)) for r in reqs]
        try:
            results = await asyncio.gather(*tasks)
        finally:  # one choice failed or the client left: its siblings are aborted (cancel aborts)
            for task in tasks:
                task.cancel()
    except json.JSONDecodeError as err:
        return error_response(f"the request body of {request.path} is not valid JSON: {err}")
    except QueueFull as err:
        return error_response(str(err), 503, "ServiceUnavailable")
    except GenerationFailed as err:
        return error_response(
            str(err), err.status, "InternalServerError" if err.status >= 500 else "BadRequest"
        )
    except (ValueError, TypeError) as err:
        return error_response(str(err))
    model = body.get("model") or DEFAULT_MODEL_NAME
    answer = to_response(body, results, engine, model)
    if not body.get("stream"):
        return web.json_response(answer)
    stream = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await stream.prepare(request)
    chunks = to_chunks(answer)
    options = body.get("stream_options") or {}
    if options.get("include_usage"):
        chunks.append({**chunk_base(answer), "choices": [], "usage": answer["usage"]})
    for chunk in chunks:
        await stream.write(f"data: {json.dumps(chunk)}\n\n".encode())
    await stream.write(b"data: [DONE]\n\n")
    await stream.write_eof()
    return stream


# ---- requests -> /generate bodies -----------------------------------------------------------


def _get(body: dict, key: str, kinds: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _as_tuple(kinds)):
        raise BadRequest(f"{key}={value!r} has the wrong type")
    return value


def _as_tuple(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _sampling(body: dict, max_new_tokens: int | None, defaults: dict[str, Any]) -> dict[str, Any]:
    """SGLang's OpenAI -> native mapping; keys left unset stay out (the native defaults apply)."""
    n = _get(body, "n", int, 1)
    if n < 1:
        raise BadRequest(f"n must be at least 1, got {n}")
    if body.get("response_format") is not None:
        raise BadRequest("response_format (constrained decoding) is not supported by the local engine")
    params: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        value = body.get(key)
        params[key] = value if value is not None else defaults.get(key)
    params["min_new_tokens"] = body.get("min_tokens")
    params["stop"] = body.get("stop")
    params["sampling_seed"] = body.get("seed")
    for key in _PASSTHROUGH:
        if params.get(key) is None and body.get(key) is not None:
            params[key] = body[key]
    return {k: v for k, v in params.items() if v is not None}


def _native(prompt: Any, sampling: dict, top: int | None, rid: str | None) -> dict[str, Any]:
    """One `/generate` body; `top` None asks for no log-probs, else for that many alternatives too."""
    native: dict[str, Any] = {
        "sampling_params": sampling,
        "return_logprob": top is not None,
        "top_logprobs_num": top or 0,
        "return_text_in_logprobs": True,
        "rid": rid or uuid.uuid4().hex,
    }
    native["text" if isinstance(prompt, str) else "input_ids"] = prompt
    return native


def _rids(body: dict, count: int) -> list[str | None]:
    rid = body.get("rid")
    if rid is None:
        return [None] * count
    if isinstance(rid, list):
        if len(rid) != count or not all(isinstance(r, str) for r in rid):
            raise BadRequest(f"rid must be a string or a list of {count} strings (one per choice)")
        return list(rid)
    if not isinstance(rid, str):
        raise BadRequest("rid must be a string")
    return [rid] if count == 1 else [f"{rid}-{i}" for i in range(count)]


def _completion_bodies(body: dict, engine: LocalEngine) -> list[dict]:
    prompt = body.get("prompt")
    if not prompt or (isinstance(prompt, list) and all(not p for p in prompt)):
        raise BadRequest("Prompt cannot be empty")
    if isinstance(prompt, str) or (isinstance(prompt, list) and isinstance(prompt[0], int)):
        prompts = [prompt]
    elif isinstance(prompt, list):
        prompts = list(prompt)
    else:
        raise BadRequest("prompt must be a string, a list of token ids, or a list of either")
    top = _get(body, "logprobs", int)
    if body.get("echo") and top:
        raise BadRequest(
            "echo with logprobs needs the prompt's log-probs, which the local engine does not compute"
        )
    max_tokens = _get(body, "max_tokens", int, 16)
    if max_tokens <= 0:
        raise BadRequest("max_tokens must be positive")
    sampling = _sampling(body, max_tokens, {})
    n = _get(body, "n", int, 1)
    rids = _rids(body, len(prompts) * n)
    return [_native(p, sampling, top, rids[i * n + j]) for i, p in enumerate(prompts) for j in range(n)]


def _chat_bodies(body: dict, engine: LocalEngine) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    ids = render_chat(engine, body)
    if not ids:
        raise BadRequest("the chat template rendered an empty prompt")
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if max_tokens is None:
        # SGLang lets the scheduler clamp an unset budget to what the context leaves.
        max_tokens = max(0, int(engine.context_length) - len(ids))
    top = _get(body, "top_logprobs", int, 0) if body.get("logprobs") else None
    sampling = _sampling(body, max_tokens, model_defaults(engine.model_path))
    n = _get(body, "n", int, 1)
    rids = _rids(body, n)
    return [_native(ids, sampling, top, rids[j]) for j in range(n)]


def render_chat(engine: LocalEngine, body: dict) -> list[int]:
    """The prompt's token ids: the tokenizer's chat template over the messages (SGLang's Jinja path)."""
    tokenizer = engine.tokenizer
    assert tokenizer is not None  # requests are taken only once the model loaded
    if not getattr(tokenizer, "chat_template", None):
        raise BadRequest(
            f"the tokenizer of {engine.tokenizer_path} has no chat template; use /v1/completions"
        )
    messages = [_template_message(m) for m in body["messages"]]
    kwargs = dict(body.get("chat_template_kwargs") or {})
    kwargs.pop("spaces_between_special_tokens", None)
    if body.get("continue_final_message"):
        kwargs.update(continue_final_message=True, add_generation_prompt=False)
    else:
        kwargs.setdefault("add_generation_prompt", True)
    tools = body.get("tools")
    if tools and body.get("tool_choice") != "none":
        kwargs["tools"] = [t.get("function", t) if isinstance(t, dict) else t for t in tools]
    try:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    except Exception as err:  # a template error is the request's fault: SGLang answers 400
        raise BadRequest(f"the chat template failed on these messages: {type(err).__name__}: {err}") from err
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def _template_message(message: Any) -> dict:
    """A message as chat templates read it: text parts of a list content joined, as SGLang does for
    templates that take string content."""
    if not isinstance(message, dict) or "role" not in message:
        raise BadRequest(f"each message must be an object with a role, got {message!r}")
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise BadRequest(f"message content parts of type {kind!r} are not supported (text only)")
            texts.append(part.get("text", ""))
        message = {**message, "content": "\n".join(texts)}
    return message


@functools.cache
def model_defaults(model_path: str) -> dict[str, Any]:
    """The sampling parameters the checkpoint recommends (generation_config.json), for chat requests."""
    path = Path(model_path) / "generation_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return dict(_MODEL_DEFAULTS)
    return {k: config.get(k, v) if config.get(k) is not None else v for k, v in _MODEL_DEFAULTS.items()}
