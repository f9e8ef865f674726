"""SGLang-shaped `/generate` responses for the local engine.

Text follows SGLang's detokenizer: a matched stop token is left out of `text` (it stays in
`output_ids`), a matched stop string is cut from `text` at its first occurrence, and
`no_stop_trim` keeps both. `weight_versions` lists the spans of output tokens each weight
version produced and `weight_version` is the last span's, as SGLang 0.5.23 reports them.
"""

from __future__ import annotations

import time
from typing import Any

from slime_wf.engine_server.sampling import Request


class GenerationFailed(RuntimeError):
    """The engine answered a request with an error status (SGLang turns that abort into an HTTP error)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def version_spans(events: list[tuple[str, int]], current: str, num_tokens: int) -> list[dict]:
    """Spans from (old version, output tokens when it was replaced) events, as SGLang's
    `compute_weight_version_spans` builds them."""
    spans: list[dict] = []
    for version, end in [*events, (current, num_tokens)]:
        end = min(end, num_tokens)
        if spans and end <= spans[-1]["end"]:
            continue
        if spans and version == spans[-1]["version"]:
            spans[-1]["end"] = end
            continue
        spans.append({"version": version, "start": spans[-1]["end"] if spans else 0, "end": end})
    return spans


def generate_response(
    req: Request,
    tokenizer,
    output_ids: list[int],
    logprobs: list[float],
    finish_reason: dict,
    version_events: list[tuple[str, int]],
    current_version: str,
    top_logprobs: list[list[tuple[float, int]] | None] | None = None,
) -> dict[str, Any]:
    p = req.params
    matched = finish_reason.get("matched")
    text_ids = (
        output_ids[:-1] if isinstance(matched, int) and not p.no_stop_trim and output_ids else output_ids
    )
    text = tokenizer.decode(
        text_ids,
        skip_special_tokens=p.skip_special_tokens,
        spaces_between_special_tokens=p.spaces_between_special_tokens,
    )
    if isinstance(matched, str):
        pos = text.find(matched)
        if pos != -1:
            text = text[: pos + len(matched)] if p.no_stop_trim else text[:pos]
    spans = version_spans(version_events, current_version, len(output_ids))
    meta = _meta(req, output_ids, finish_reason, spans[-1]["version"])
    meta["weight_versions"] = spans
    if req.return_logprob:

        def text_of(token: int) -> str | None:
            return tokenizer.decode([token]) if req.return_text_in_logprobs else None

        meta["output_token_logprobs"] = [
            [lp, tok, text_of(tok)] for lp, tok in zip(logprobs, output_ids, strict=True)
        ]
        if req.top_logprobs_num > 0:
            meta["output_top_logprobs"] = [
                None if row is None else [[lp, tok, text_of(tok)] for lp, tok in row]
                for row in (top_logprobs or [None] * len(output_ids))
            ]
    return {"text": text, "output_ids": list(output_ids), "meta_info": meta}


def waiting_abort_response(req: Request, current_version: str) -> dict[str, Any]:
    """A request aborted before it was scheduled: SGLang sends no prompt or cache counts for it."""
    meta: dict[str, Any] = {
        "id": req.rid,
        "finish_reason": {"type": "abort", "message": "Abort in waiting queue"},
        "weight_version": current_version,
        "e2e_latency": time.perf_counter() - req.arrival,
        "completion_tokens": 0,
    }
    if req.return_logprob:
        meta["output_token_logprobs"] = []
    return {"text": "", "output_ids": [], "meta_info": meta}


def error_response(
    req: Request, output_ids: list[int], finish_reason: dict, current_version: str
) -> dict[str, Any]:
    """The answer to a request the engine failed, built without the tokenizer (which may be what failed)."""
    return {
        "text": "",
        "output_ids": list(output_ids),
        "meta_info": _meta(req, output_ids, finish_reason, current_version),
    }


def _meta(req: Request, output_ids: list[int], finish_reason: dict, weight_version: str) -> dict[str, Any]:
    """SGLang's meta_info of a scheduled request (no prefix cache here: cached_tokens is 0)."""
    return {
        "id": req.rid,
        "finish_reason": finish_reason,
        "prompt_tokens": len(req.input_ids),
        "completion_tokens": len(output_ids),
        "cached_tokens": 0,
        "weight_version": weight_version,
        "e2e_latency": time.perf_counter() - req.arrival,
    }
