"""The OpenAI response shapes SGLang 0.5.23 serves (`srt/entrypoints/openai/protocol.py`,
`serving_completions.py`, `serving_chat.py`), built from native `/generate` answers: completions
and chat completions, their `logprobs` (`LogProbs`, `ChoiceLogprobs` with raw `bytes`), `usage`,
`metadata` (weight versions), and the stream chunks of both.
"""

from __future__ import annotations

import functools
import time
from typing import Any


def _usage(results: list[dict], n: int) -> dict[str, Any]:
    prompt = sum(r["meta_info"].get("prompt_tokens", 0) for r in results[::n])
    completion = sum(r["meta_info"].get("completion_tokens", 0) for r in results)
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": None,
        "reasoning_tokens": 0,
        "completion_tokens_details": None,
    }


def _metadata(meta: dict) -> dict[str, Any]:
    out = {"weight_version": meta["weight_version"]}
    if "weight_versions" in meta:
        out["weight_versions"] = meta["weight_versions"]
    return out


def _finish(meta: dict) -> tuple[str | None, Any]:
    reason = meta.get("finish_reason")
    return (reason["type"], reason.get("matched")) if reason else (None, None)


def completion_response(body: dict, results: list[dict], engine: Any, model: str) -> dict:
    n = body.get("n") or 1
    prompt = body["prompt"]
    prompts = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt
    choices = []
    for index, result in enumerate(results):
        text = result["text"]
        if body.get("echo"):
            echoed = prompts[index // n]
            assert engine.tokenizer is not None
            text = (echoed if isinstance(echoed, str) else engine.tokenizer.decode(echoed)) + text
        logprobs = None
        if body.get("logprobs") is not None:
            meta = result["meta_info"]
            logprobs = {
                "text_offset": [-1] * len(meta["output_token_logprobs"]),
                "token_logprobs": [e[0] for e in meta["output_token_logprobs"]],
                "tokens": [e[2] for e in meta["output_token_logprobs"]],
                "top_logprobs": [
                    None if row is None else {e[2]: e[0] for e in row}
                    for row in meta.get("output_top_logprobs", [])
                ],
            }
        reason, matched = _finish(result["meta_info"])
        choice: dict[str, Any] = {
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": reason,
            "matched_stop": matched,
        }
        if body.get("return_token_ids"):
            choice["token_ids"] = result["output_ids"]
        choices.append(choice)
    return {
        "id": results[0]["meta_info"]["id"],
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": _usage(results, n),
        "metadata": _metadata(results[0]["meta_info"]),
    }


def chat_response(body: dict, results: list[dict], engine: Any, model: str) -> dict:
    choices = []
    for index, result in enumerate(results):
        reason, matched = _finish(result["meta_info"])
        logprobs = None
        if body.get("logprobs"):
            meta = result["meta_info"]
            tops = meta.get("output_top_logprobs") or [None] * len(meta["output_token_logprobs"])
            logprobs = {
                "content": [
                    {
                        **_token_entry(engine, e),
                        "top_logprobs": [_token_entry(engine, t) for t in (row or [])],
                    }
                    for e, row in zip(meta["output_token_logprobs"], tops, strict=True)
                ]
            }
        message = {"role": "assistant", "content": result["text"], "reasoning_content": None}
        choices.append(
            {
                "index": index,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": reason,
                "matched_stop": matched,
            }
        )
    return {
        "id": results[0]["meta_info"]["id"],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": _usage(results, len(results)),
        "metadata": _metadata(results[0]["meta_info"]),
    }


def _token_entry(engine: Any, entry: list) -> dict[str, Any]:
    logprob, token, text = entry
    return {"token": text or "", "bytes": token_bytes(engine.tokenizer, token, text), "logprob": logprob}


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-character -> byte table of byte-level BPE vocabularies."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def token_bytes(tokenizer: Any, token: int, text: str | None) -> list[int]:
    """A token's raw bytes (OpenAI's `bytes`): through the byte decoder for byte-level BPE vocabularies,
    whose pieces may be parts of a UTF-8 character, else the UTF-8 of its text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and "ByteLevel" in type(backend.decoder).__name__ + repr(backend.decoder):
        piece = tokenizer.convert_ids_to_tokens(token)
        table = _byte_decoder()
        if piece and all(ch in table for ch in piece):
            return [table[ch] for ch in piece]
    return list((text or "").encode("utf-8"))


def chunk_base(answer: dict) -> dict[str, Any]:
    kind = "chat.completion.chunk" if answer["object"] == "chat.completion" else "text_completion"
    return {"id": answer["id"], "object": kind, "created": answer["created"], "model": answer["model"]}


def completion_chunks(answer: dict) -> list[dict]:
    chunks = []
    for choice in answer["choices"]:
        chunks.append(
            {**chunk_base(answer), "choices": [{**choice, "finish_reason": None, "matched_stop": None}]}
        )
        end = {"index": choice["index"], "text": "", "logprobs": None}
        chunks.append({**chunk_base(answer), "choices": [{**end, **_reason(choice)}]})
    return chunks


def chat_chunks(answer: dict) -> list[dict]:
    chunks = []
    for choice in answer["choices"]:
        delta = {"role": "assistant", "content": choice["message"]["content"], "reasoning_content": None}
        first = {
            "index": choice["index"],
            "delta": delta,
            "logprobs": choice["logprobs"],
            "finish_reason": None,
        }
        chunks.append({**chunk_base(answer), "choices": [{**first, "matched_stop": None}]})
        end = {"index": choice["index"], "delta": {}, "logprobs": None}
        chunks.append({**chunk_base(answer), "choices": [{**end, **_reason(choice)}]})
    return chunks


def _reason(choice: dict) -> dict[str, Any]:
    return {"finish_reason": choice["finish_reason"], "matched_stop": choice["matched_stop"]}
