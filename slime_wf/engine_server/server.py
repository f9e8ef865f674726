"""The engine server's HTTP side: SGLang's native endpoints over one `LocalEngine`, the API and admin
keys as SGLang checks them, and `main` (run by `python -m slime_wf.engine_server`, flags in `args`).

Every `/generate` body passes SGLang's own schema (`schema`) before the server's own checks
(`requests.build_request`); refusals carry SGLang's status codes and bodies. What the server is, and where it
differs from SGLang, is in the package docstring.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import signal
import threading
import time
import uuid

from aiohttp import web

from slime_wf.checkpoint.dtypes import dtype_name
from slime_wf.engine_server import openai_api, weight_update
from slime_wf.engine_server.args import check_args, parse_args
from slime_wf.engine_server.engine import HEALTH_CHECK_RID_PREFIX, LocalEngine, QueueFull
from slime_wf.engine_server.loads import loads_response
from slime_wf.engine_server.requests import (
    ContractViolation,
    check_generate_body,
    parse_generate,
)
from slime_wf.engine_server.response import GenerationFailed
from slime_wf.engine_server.sampling import InvalidRequest, Request, SamplingParams

logger = logging.getLogger("slime_wf.engine_server")

ENGINE = web.AppKey("engine", LocalEngine)
ARGS = web.AppKey("args", argparse.Namespace)
# SGLang's `AuthLevel.ADMIN_OPTIONAL` endpoints among those served here (`srt/entrypoints/http_server.py`).
ADMIN_PATHS = frozenset(
    {
        "/abort_request",
        "/pause_generation",
        "/continue_generation",
        "/flush_cache",
        "/update_weights_from_disk",
        *weight_update.PATHS,
    }
)
# Probes stay open whatever the keys, as in SGLang (`srt/utils/auth.py`), for health checks without secrets.
_OPEN_PREFIXES = ("/health", "/ready", "/metrics")
# The wait a client is asked to take when the queue is full; a request takes about this long on a CPU.
QUEUE_FULL_RETRY_AFTER_S = 1


def _error(message: str, status: int = 400) -> web.Response:
    """SGLang's error body for a request its tokenizer manager refuses."""
    return web.json_response({"error": {"message": message}}, status=status)


def _http_exception(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """SGLang's body for an `HTTPException` (its `ErrorResponse`), e.g. a full queue or a failed request."""
    body = {"object": "error", "message": message, "type": str(status), "param": None, "code": status}
    return web.json_response(body, status=status, headers=headers)


def auth_refusal(
    method: str, path: str, authorization: str | None, api_key: str | None, admin_api_key: str | None
) -> int | None:
    """SGLang's `decide_request_auth` for the endpoints served here: the status to refuse with, or None.

    Admin endpoints take the admin key when there is one (the API key is then refused), else the API
    key; other endpoints take the API key when there is one; `/health*` is always open."""
    if method == "OPTIONS" or path.startswith(_OPEN_PREFIXES):
        return None
    if path in ADMIN_PATHS:
        expected = admin_api_key or api_key
    else:
        expected = api_key
    if not expected:
        return None
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and token and secrets.compare_digest(token.encode(), expected.encode()):
        return None
    return 401


def _auth_middleware(api_key: str | None, admin_api_key: str | None):
    @web.middleware
    async def check_key(request: web.Request, handler):
        status = auth_refusal(
            request.method, request.path, request.headers.get("Authorization"), api_key, admin_api_key
        )
        if status is not None:
            return web.json_response({"error": "Unauthorized"}, status=status)
        return await handler(request)

    return check_key


async def _json_body(request: web.Request) -> dict:
    raw = await request.read()
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as err:
        raise InvalidRequest(f"the request body of {request.path} is not valid JSON: {err}") from err
    if not isinstance(body, dict):
        raise InvalidRequest(f"the request body of {request.path} must be a JSON object")
    return body


def _not_ready(engine: LocalEngine) -> web.Response | None:
    if not engine.ready.is_set():
        return _error("the model is still loading", status=503)
    if engine.load_error is not None:
        return _error(f"the model failed to load: {engine.load_error}", status=503)
    return None


async def _await_generation(engine: LocalEngine, req: Request) -> dict:
    try:
        return await asyncio.wrap_future(engine.submit(req))
    except asyncio.CancelledError:
        # The client went away: free the slot, as SGLang aborts on disconnect.
        engine.abort(only=req)
        raise


async def run_request(engine: LocalEngine, req: Request) -> dict:
    """Run a checked request; its SGLang-shaped response, or `GenerationFailed` for an error abort."""
    result = await _await_generation(engine, req)
    reason = result["meta_info"]["finish_reason"]
    status = reason.get("status_code")
    if reason.get("type") == "abort" and isinstance(status, int) and 400 <= status < 600:
        # SGLang's tokenizer manager turns an abort that carries an error status into that HTTP error.
        raise GenerationFailed(status, reason["message"])
    return result


async def run_batch(engine: LocalEngine, reqs: list[Request]) -> list[dict]:
    """A batched request's prompts, generated concurrently (each one is a request of the scheduler, with
    its own rid to abort): their responses in order. As in SGLang, the batch fails as a whole with the
    first error, and its other requests are aborted (a cancelled request frees its slot itself, see
    `_await_generation`)."""
    runs = [asyncio.ensure_future(run_request(engine, req)) for req in reqs]
    try:
        return list(await asyncio.gather(*runs))
    except BaseException:
        for run in runs:
            run.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
        raise


async def generate(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    if (resp := _not_ready(engine)) is not None:
        return resp
    raw = await request.read()
    try:
        parsed = await asyncio.to_thread(parse_generate, raw, engine)
        if isinstance(parsed, list):
            return web.json_response(await run_batch(engine, parsed))
        result = await run_request(engine, parsed)
    except ContractViolation as err:
        return web.json_response({"error": str(err)}, status=400)
    except QueueFull as err:
        return _http_exception(503, str(err), headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)})
    except GenerationFailed as err:
        return _error(str(err)) if err.status == 400 else _http_exception(err.status, str(err))
    except (ValueError, TypeError) as err:  # SGLang answers a request it cannot take with 400
        return _error(str(err))
    return web.json_response(result)


async def get_loads(request: web.Request) -> web.Response:
    return loads_response(request.app[ENGINE], request.query)


async def abort_request(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    try:
        body = await _json_body(request)
    except InvalidRequest as err:
        return _error(str(err))
    rid, abort_all = body.get("rid", ""), bool(body.get("abort_all", False))
    if not isinstance(rid, str):
        return _error("rid must be a string")
    if engine.ready.is_set():
        engine.abort(rid, abort_all)
    return web.Response(status=200)


async def pause_generation(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    if (resp := _not_ready(engine)) is not None:
        return resp
    try:
        body = await _json_body(request)
        await asyncio.to_thread(engine.pause, body.get("mode", "abort"))
    except InvalidRequest as err:
        return _error(str(err))
    return web.json_response({"message": "Generation paused successfully.", "status": "ok"})


async def continue_generation(request: web.Request) -> web.Response:
    request.app[ENGINE].resume()
    return web.json_response({"message": "Generation continued successfully.", "status": "ok"})


async def flush_cache(request: web.Request) -> web.Response:
    """There is no prefix cache to drop; like SGLang it refuses while requests run (or wait, unpaused)."""
    engine = request.app[ENGINE]
    try:
        timeout = float(request.query.get("timeout", 0.0))
    except ValueError:
        return _error("timeout must be a number of seconds")
    idle = await asyncio.to_thread(engine.wait_idle, timeout)
    if not idle:
        running, waiting = engine.num_requests()
        return web.Response(
            text=f"Cache not flushed: {running} running and {waiting} waiting requests. "
            "Abort or pause them first, or pass ?timeout=SECONDS to wait.\n",
            status=400,
        )
    return web.Response(text="Cache flushed.\n", status=200)


async def update_weights_from_disk(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    try:
        body = await _json_body(request)
    except InvalidRequest as err:
        return web.json_response(
            {"success": False, "message": str(err), "num_paused_requests": 0}, status=400
        )
    model_path = body.get("model_path")
    if not isinstance(model_path, str) or not model_path:
        return web.json_response(
            {
                "success": False,
                "message": "model_path (a checkpoint directory) is required",
                "num_paused_requests": 0,
            },
            status=400,
        )
    version = body.get("weight_version")
    success, message, paused = await asyncio.to_thread(
        engine.update_weights_from_disk,
        model_path,
        None if version is None else str(version),
        bool(body.get("abort_all_requests", False)),
    )
    content = {"success": success, "message": message, "num_paused_requests": paused}
    return web.json_response(content, status=200 if success else 400)


async def health(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    ok = engine.ready.is_set() and engine.load_error is None and engine.is_alive()
    return web.Response(status=200 if ok else 503)


async def health_generate(request: web.Request) -> web.Response:
    """Healthy when the scheduler produces a token: a running batch that stepped lately counts, as in SGLang."""
    engine = request.app[ENGINE]
    if _not_ready(engine) is not None or not engine.is_alive():
        return web.Response(status=503)
    if engine.paused or time.monotonic() - engine.last_step_time < 5.0:
        return web.Response(status=200)
    req = Request(
        rid=f"{HEALTH_CHECK_RID_PREFIX}_{uuid.uuid4().hex}",
        input_ids=[0],
        params=SamplingParams.from_request({"max_new_tokens": 1, "temperature": 0.0}, engine.vocab_size),
    )
    try:
        result = await asyncio.wait_for(_await_generation(engine, req), timeout=20)
    except (TimeoutError, InvalidRequest, QueueFull):
        return web.Response(status=503)
    return web.Response(status=500 if result["meta_info"]["finish_reason"].get("status_code") else 200)


async def model_info(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    config = engine.model.config if engine.model is not None else None
    return web.json_response(
        {
            "model_path": engine.model_path,
            "served_model_name": engine.model_path,
            "tokenizer_path": engine.tokenizer_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": engine.weight_version,
            "load_format": "auto",
            "reasoning_parser": None,
            "tool_call_parser": None,
            "model_type": getattr(config, "model_type", None),
            "architectures": getattr(config, "architectures", None),
        }
    )


async def server_info(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    args = request.app[ARGS]
    running, waiting = engine.num_requests() if engine.ready.is_set() else (0, 0)
    return web.json_response(
        {
            "model_path": engine.model_path,
            "served_model_name": engine.model_path,
            "tokenizer_path": engine.tokenizer_path,
            "host": args.host,
            "port": args.port,
            "dtype": dtype_name(engine.dtype),
            "max_running_requests": engine.max_running_requests,
            "max_queued_requests": engine.max_queued_requests,
            "max_context_length": getattr(engine, "context_length", None),
            "num_threads": args.num_threads,
            "min_gflop_per_thread": args.min_gflop_per_thread,
            "engine": "slime_wf.engine_server",
            "version": "local",
            "internal_states": [
                {"num_running_reqs": running, "num_waiting_reqs": waiting, "paused": engine.paused}
            ],
        }
    )


def build_app(engine: LocalEngine, args: argparse.Namespace) -> web.Application:
    middlewares = []
    if args.api_key or args.admin_api_key:
        middlewares.append(_auth_middleware(args.api_key, args.admin_api_key))
    app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=middlewares)
    app[ENGINE] = engine
    app[ARGS] = args
    app.router.add_route("POST", "/generate", generate)
    app.router.add_route("PUT", "/generate", generate)
    app.router.add_post("/abort_request", abort_request)
    app.router.add_post("/pause_generation", pause_generation)
    app.router.add_post("/continue_generation", continue_generation)
    app.router.add_route("*", "/flush_cache", flush_cache)
    app.router.add_post("/update_weights_from_disk", update_weights_from_disk)
    weight_update.add_routes(app, engine)
    app.router.add_get("/v1/loads", get_loads)
    openai_api.add_routes(app, engine, check_generate_body, run_request)
    app.router.add_get("/health", health)
    app.router.add_get("/health_generate", health_generate)
    for path in ("/model_info", "/get_model_info"):
        app.router.add_get(path, model_info)
    for path in ("/server_info", "/get_server_info"):
        app.router.add_get(path, server_info)

    async def on_shutdown(app: web.Application) -> None:
        engine.abort(abort_all=True)
        await asyncio.to_thread(engine.shutdown)

    app.on_shutdown.append(on_shutdown)
    return app


def _exit_with_parent(parent: int) -> None:
    """Once the launcher is gone (this process was reparented), shut down: gracefully when serving,
    at once when it died before the server was up."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        logger.warning("the launching process (pid %d) is gone; exiting", parent)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)
        os._exit(1)  # the graceful path did not finish (e.g. still loading the model)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    import torch

    from slime_wf.engine_server.model import resolve_dtype

    args = parse_args(argv)
    check_args(args)
    if args.parent_pid is not None:
        _exit_with_parent(args.parent_pid)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    engine = LocalEngine(
        args.model_path,
        tokenizer_path=args.tokenizer_path,
        dtype=resolve_dtype(args.dtype),
        max_running_requests=args.max_running_requests,
        max_queued_requests=args.max_queued_requests,
        weight_version=args.weight_version,
        min_gflop_per_thread=args.min_gflop_per_thread,
    )
    engine.start()
    app = build_app(engine, args)

    async def exit_on_load_failure(app: web.Application) -> None:
        async def watch() -> None:
            await asyncio.to_thread(engine.ready.wait)
            if engine.load_error is not None:
                logger.error("exiting: the model could not be loaded")
                os.kill(os.getpid(), signal.SIGINT)  # run_app's own graceful shutdown

        app["load_watch"] = asyncio.get_running_loop().create_task(watch())

    app.on_startup.append(exit_on_load_failure)
    logger.info("listening on http://%s:%d", args.host, args.port)
    # handler_cancellation: a client that disconnects cancels its handler, which aborts its request.
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None, handler_cancellation=True)
    if engine.load_error is not None:
        raise SystemExit(1)
