"""The engine client's answer to a busy engine, against a peer that answers as SGLang 0.5.23 does.

SGLang refuses a request when its `--max-queued-requests` queue is full with HTTP 503 and its
`ErrorResponse` body, without `Retry-After` (`srt/managers/scheduler.py`, `http_server.py`); the
engine server answers the same and adds `Retry-After`, which `tests/integration/test_local_server.py` covers.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time

import pytest
from aiohttp import web

from slime_wf.rollout.engine_client import EngineBusy, EngineError, EngineSession, retry_after_seconds
from slime_wf.servers import free_port

QUEUE_FULL = {
    "object": "error",
    "message": "The request queue is full.",
    "type": "503",
    "param": None,
    "code": 503,
}
OK = {
    "text": "",
    "output_ids": [],
    "meta_info": {"id": "x", "finish_reason": {"type": "length", "length": 0}},
}


async def serve(handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/generate", handler)
    app.router.add_post("/pause_generation", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


def busy_for(refusals: int, status: int = 503, headers: dict | None = None):
    """A /generate that refuses the first `refusals` calls as busy, then answers; it counts the calls."""
    calls = []

    async def handler(request: web.Request) -> web.Response:
        calls.append(request.path)
        if len(calls) <= refusals:
            return web.json_response(QUEUE_FULL, status=status, headers=headers)
        return web.json_response(OK)

    return handler, calls


def test_busy_engine_without_retry_after_is_backed_off_and_retried():
    handler, calls = busy_for(3)

    async def main():
        runner, url = await serve(handler)
        try:
            async with EngineSession([url], busy_retries=5) as session:
                session.client = _fast_backoff(session.client)
                out, served_by = await session.generate({"input_ids": [1]})
                return out, served_by == url, session
        finally:
            await runner.cleanup()

    out, served_by_it, session = asyncio.run(main())
    assert out == OK and served_by_it
    assert len(calls) == 4 and session.busy_answers == 3
    assert not session.down  # busy is not down


@pytest.mark.parametrize("status", [503, 429])
def test_busy_retries_are_bounded_and_the_engine_stays_up(status):
    handler, calls = busy_for(1000, status=status)
    downs = []

    async def main():
        runner, url = await serve(handler)
        try:
            async with EngineSession([url], busy_retries=2, on_engine_down=downs.append) as session:
                session.client = _fast_backoff(session.client)
                with pytest.raises(EngineBusy, match="still busy after 2 retries") as busy:
                    await session.generate({"input_ids": [1]})
                return busy.value, session
        finally:
            await runner.cleanup()

    error, session = asyncio.run(main())
    assert error.status == status and len(calls) == 3
    assert not session.down and not downs


def test_a_busy_answer_to_a_control_call_is_not_retried():
    handler, calls = busy_for(1000)

    async def main():
        runner, url = await serve(handler)
        try:
            async with EngineSession([url]) as session:
                with pytest.raises(EngineError) as refused:
                    await session.client(url).pause_generation()
                return refused.value
        finally:
            await runner.cleanup()

    error = asyncio.run(main())
    assert not isinstance(error, EngineBusy) and error.status == 503 and calls == ["/pause_generation"]


def test_retry_after_is_honoured(caplog):
    """The wait before a retry is never shorter than the engine's Retry-After (read from the client's log)."""
    handler, calls = busy_for(2, headers={"Retry-After": "1"})

    async def main():
        runner, url = await serve(handler)
        try:
            async with EngineSession([url]) as session:
                session.client = _fast_backoff(session.client)
                return await session.generate({"input_ids": [1]})
        finally:
            await runner.cleanup()

    with caplog.at_level(logging.DEBUG, logger="slime_wf.rollout.engine_client"):
        asyncio.run(main())
    waits = [r.args[3] for r in caplog.records if "is busy" in r.getMessage()]
    assert len(calls) == 3 and len(waits) == 2
    assert all(1.0 <= w <= 1.25 for w in waits)  # Retry-After, plus at most 25% jitter


def test_retry_after_parsing():
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    later = email.utils.formatdate(time.time() + 120, usegmt=True)
    assert 100 < retry_after_seconds(later) <= 120
    assert retry_after_seconds(email.utils.formatdate(time.time() - 60, usegmt=True)) == 0.0
    assert issubclass(EngineBusy, EngineError)


def _fast_backoff(make_client):
    """The session's clients with a tiny base back-off, so the tests do not wait seconds (Retry-After still holds)."""

    def client(url):
        c = make_client(url)
        c.busy_backoff = 0.01
        return c

    return client
