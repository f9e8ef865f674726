"""`slime.utils.http_utils`: `post` and `get` as slime's plugins call them.

Inside a rollout, a request to the campaign's router address (`args.sglang_router_ip` /
`args.sglang_router_port`, which the rollout sets: the router, else the first engine) goes through
the rollout's engine session: `/generate` is spread over every live engine (or sent to the router),
carries the engines' API key, and a dead engine is restarted behind it; `GET /workers` lists the
engines, as sglang-router answers it. Requests to an engine's own address get its API key. Any
other URL is a plain HTTP call, retried like slime's (`max_retries` attempts, one second apart).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import urllib.parse
from typing import Any

import aiohttp

from slime_wf.rollout.engine_client import EngineRejected, EngineTimeout, EngineUnavailable
from slime_wf.rollout.generate import RolloutContext, current_context

logger = logging.getLogger(__name__)

# Attempts on another engine after the chosen one proved unreachable (the session marks it down).
_UNAVAILABLE_RETRIES = 8


def _rollout() -> RolloutContext | None:
    try:
        return current_context()
    except RuntimeError:
        return None


def _base(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port}", parts.path


def _router_address(ctx: RolloutContext) -> str | None:
    ip, port = getattr(ctx.args, "sglang_router_ip", None), getattr(ctx.args, "sglang_router_port", None)
    return f"http://{ip}:{port}" if ip and port else None


def _engine_headers(ctx: RolloutContext | None, base: str) -> dict[str, str]:
    if ctx is None or not getattr(ctx.session, "api_key", None):
        return {}
    known = {_base(u)[0] for u in [*ctx.session.worker_urls, ctx.session.router_url or ""] if u}
    return {"Authorization": f"Bearer {ctx.session.api_key}"} if base in known else {}


async def _session_generate(ctx: RolloutContext, payload: dict[str, Any]) -> dict[str, Any]:
    timeout = getattr(ctx.args, "rollout_request_timeout", None)
    for attempt in range(_UNAVAILABLE_RETRIES + 1):
        try:
            output, _url = await ctx.session.generate(payload, timeout=timeout)
        except EngineUnavailable:
            ctx.counters["request_retries_engine_down"] += 1
            if attempt == _UNAVAILABLE_RETRIES:
                raise
            await asyncio.sleep(min(0.1 * (attempt + 1), 1.0))
            continue
        except EngineTimeout:
            ctx.counters["request_timeouts"] += 1
            raise
        except EngineRejected:
            ctx.counters["request_rejected"] += 1
            raise
        pairs = (output.get("meta_info") or {}).get("output_token_logprobs") or []
        ctx.generated_tokens += len(pairs)
        return output
    raise AssertionError("unreachable")


async def _http(method: str, url: str, payload: Any, max_retries: int, headers: dict[str, str] | None) -> Any:
    last: Exception | None = None
    for attempt in range(1, max_retries + 1):
        try:
            async with aiohttp.ClientSession(trust_env=False) as session:
                async with session.request(method, url, json=payload, headers=headers) as resp:
                    body = await resp.read()
                    if resp.status >= 400:
                        raise aiohttp.ClientResponseError(
                            resp.request_info,
                            resp.history,
                            status=resp.status,
                            message=body.decode(errors="replace")[:500],
                        )
            try:
                return json.loads(body)
            except ValueError:
                return body.decode(errors="replace")
        except (TimeoutError, aiohttp.ClientError, OSError) as err:
            last = err
            logger.info("%s %s failed (attempt %d/%d): %s", method, url, attempt, max_retries, err)
            if attempt < max_retries:
                await asyncio.sleep(1)
    assert last is not None
    raise last


async def post(url: str, payload: Any, max_retries: int = 60, headers: dict[str, str] | None = None) -> Any:
    """POST `payload` as JSON to `url` and return the decoded answer (slime's `post`)."""
    ctx = _rollout()
    base, path = _base(url)
    if ctx is not None and base == _router_address(ctx) and path.rstrip("/") == "/generate":
        return await _session_generate(ctx, dict(payload or {}))
    return await _http(
        "POST", url, payload or {}, max(1, max_retries), {**_engine_headers(ctx, base), **(headers or {})}
    )


async def get(url: str) -> Any:
    """GET `url` and return the decoded answer (slime's `get`)."""
    ctx = _rollout()
    base, path = _base(url)
    if ctx is not None and base == _router_address(ctx) and path.rstrip("/") == "/workers":
        return {"workers": [{"url": u} for u in ctx.session.worker_urls]}
    return await _http("GET", url, None, 1, _engine_headers(ctx, base))


def get_rollout_num_engines(args: Any) -> int:
    """The engines behind the router address: those of the rollout in progress, else `num_engines`."""
    ctx = _rollout()
    if ctx is not None and getattr(ctx.session, "worker_urls", None):
        return len(ctx.session.worker_urls)
    return int(getattr(args, "num_engines", 1) or 1)


def is_port_available(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("", port))
            return True
        except (OSError, OverflowError):
            return False


__all__ = ["get", "get_rollout_num_engines", "is_port_available", "post"]
