"""An async client for engines that speak SGLang's native HTTP API.

Both engines (real SGLang on GPUs, the local CPU server) answer the same requests, so the rollout
has one code path. `EngineSession` spreads `/generate` over the engines (or sends it to an
sglang-router), bounds the requests in flight per engine, fails over when an engine dies, and
sends control calls (abort, pause, weight updates, flush) to every engine directly: the router does
not forward them.

Keys follow SGLang's `--api-key` / `--admin-api-key`: `/generate` and the info endpoints carry the API
key, control calls carry the admin key when one is given (SGLang's admin endpoints then refuse the
API key), else the API key. A `/generate` refused as busy (HTTP 503, as SGLang answers when its
`--max-queued-requests` queue is full, or 429) is retried with an exponential back-off, never sooner
than the `Retry-After` the engine asks for; the engine is not marked down for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp

logger = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """An engine answered with an error; `status` is the HTTP status when there was one."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after: float | None = None  # seconds, from the answer's Retry-After header


class EngineRejected(EngineError):
    """The engine refused this one request (HTTP 4xx other than 408/429): the request itself is bad
    (too long for the context, empty, a parameter the engine does not take), so retrying the same
    request elsewhere cannot help. The engine itself is fine."""


class EngineBusy(EngineError):
    """The engine stayed too busy to take a request (HTTP 503 or 429) through every retry. The engine
    itself works: it is not marked down."""


class EngineUnavailable(EngineError):
    """An engine could not be reached (refused, reset, dead)."""


class EngineTimeout(EngineError):
    """A request to an engine took longer than its timeout."""


BUSY_STATUSES = (429, 503)


def retry_after_seconds(value: str | None) -> float | None:
    """A `Retry-After` header (seconds, or an HTTP date) as seconds from now; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _prompts_in(payload: dict[str, Any]) -> int:
    """How many prompts a `/generate` body carries: more than one for SGLang's batched form."""
    ids, text = payload.get("input_ids"), payload.get("text")
    if isinstance(ids, list) and ids and isinstance(ids[0], list):
        return len(ids)
    return len(text) if isinstance(text, list) else 1


class _Capacity:
    """A semaphore whose holders take several units at once: a batched request holds one per prompt.
    A request larger than the whole capacity waits until nothing else is in flight, then goes alone."""

    def __init__(self, units: int):
        self.units = units
        self.used = 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def take(self, weight: int = 1) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: self.used == 0 or self.used + weight <= self.units)
            self.used += weight
        try:
            yield
        finally:
            async with self._changed:
                self.used -= weight
                self._changed.notify_all()


class EngineClient:
    """One engine (or router) at `url`.

    `busy_retries` bounds how often a busy `/generate` is retried. Each wait is at least the engine's
    `Retry-After` and grows as `busy_backoff` × 2^attempt (so a long busy spell is outlasted), at most
    `max_busy_wait` s, plus up to 25% jitter so that refused clients do not all come back at once.
    """

    def __init__(
        self,
        url: str,
        session: aiohttp.ClientSession,
        api_key: str | None = None,
        *,
        admin_api_key: str | None = None,
        busy_retries: int = 10,
        busy_backoff: float = 0.5,
        max_busy_wait: float = 30.0,
        on_busy: Callable[[], Any] | None = None,
    ):
        self.url = url.rstrip("/")
        self.session = session
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        control_key = admin_api_key or api_key
        self.admin_headers = {"Authorization": f"Bearer {control_key}"} if control_key else None
        self.busy_retries = busy_retries
        self.busy_backoff = busy_backoff
        self.max_busy_wait = max_busy_wait
        self.on_busy = on_busy  # called on every busy answer, e.g. to count them

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        timeout: float | None = None,
        admin: bool = False,
        retry_busy: bool = False,
    ) -> Any:
        """One call; with `retry_busy`, a busy answer is waited out and retried `busy_retries` times."""
        attempt = 0
        while True:
            try:
                return await self._request_once(method, path, json=json, timeout=timeout, admin=admin)
            except EngineError as err:
                if not retry_busy or err.status not in BUSY_STATUSES:
                    raise
                if self.on_busy is not None:
                    self.on_busy()
                if attempt >= self.busy_retries:
                    raise EngineBusy(f"{err} (still busy after {attempt} retries)", err.status) from err
                wait = max(err.retry_after or 0.0, self.busy_backoff * 2**attempt)
                wait = min(wait, self.max_busy_wait) * (1 + 0.25 * random.random())
                attempt += 1
                logger.debug("%s is busy (HTTP %s); retry %d in %.2f s", self.url, err.status, attempt, wait)
                await asyncio.sleep(wait)

    async def _request_once(
        self, method: str, path: str, *, json: Any = None, timeout: float | None = None, admin: bool = False
    ) -> Any:
        try:
            async with self.session.request(
                method,
                f"{self.url}{path}",
                json=json,
                timeout=aiohttp.ClientTimeout(total=timeout),
                headers=self.admin_headers if admin else self.headers,
            ) as resp:
                body = await resp.read()
                if resp.status >= 400:
                    text = body.decode(errors="replace")[:500]
                    message = f"{method} {self.url}{path} -> HTTP {resp.status}: {text}"
                    if resp.status in (401, 403):
                        which = "admin key (admin_api_key)" if admin else "API key (api_key)"
                        message += f"; the engine wants its {which} as Authorization: Bearer"
                    if 400 <= resp.status < 500 and resp.status not in (408, 429):
                        raise EngineRejected(message, resp.status)
                    error = EngineError(message, resp.status)
                    error.retry_after = retry_after_seconds(resp.headers.get("Retry-After"))
                    raise error
                if not body:
                    return None
                try:
                    return await resp.json(content_type=None)
                except ValueError:
                    return body.decode(errors="replace")
        except TimeoutError:
            raise EngineTimeout(f"{method} {self.url}{path} timed out after {timeout} s") from None
        except (aiohttp.ClientConnectionError, ConnectionError, OSError) as err:
            raise EngineUnavailable(
                f"engine {self.url} is unreachable ({type(err).__name__}: {err})"
            ) from err

    async def generate(self, payload: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        return await self._request("POST", "/generate", json=payload, timeout=timeout, retry_busy=True)

    async def abort(self, rid: str | None = None, abort_all: bool = False) -> None:
        body = {"rid": rid or "", "abort_all": abort_all}
        await self._request("POST", "/abort_request", json=body, timeout=30, admin=True)

    async def pause_generation(self, mode: str = "abort") -> None:
        await self._request("POST", "/pause_generation", json={"mode": mode}, timeout=60, admin=True)

    async def continue_generation(self) -> None:
        await self._request("POST", "/continue_generation", json={}, timeout=60, admin=True)

    async def flush_cache(self) -> None:
        await self._request("POST", "/flush_cache", timeout=60, admin=True)

    async def update_weights_from_disk(
        self,
        model_path: str,
        weight_version: str,
        *,
        flush_cache: bool = True,
        abort_all_requests: bool = False,
        timeout: float = 600,
    ) -> dict[str, Any]:
        body = {
            "model_path": model_path,
            "weight_version": str(weight_version),
            "flush_cache": flush_cache,
            "abort_all_requests": abort_all_requests,
        }
        return await self._request(
            "POST", "/update_weights_from_disk", json=body, timeout=timeout, admin=True
        )

    async def control(self, path: str, body: dict[str, Any], timeout: float | None = 600) -> Any:
        """Any other management call (admin key), e.g. the weight-update group endpoints of
        `slime_wf.weight_sync.distributed`; raises EngineRejected on a 4xx answer."""
        return await self._request("POST", path, json=body, timeout=timeout, admin=True)

    async def model_info(self, timeout: float = 30) -> dict[str, Any]:
        return await self._request("GET", "/model_info", timeout=timeout)

    async def health_generate(self, timeout: float = 30) -> bool:
        try:
            await self._request("GET", "/health_generate", timeout=timeout)
            return True
        except EngineError:
            return False


class EngineSession:
    """The engines of a fleet for the duration of one async job (a rollout, a weight sync).

    `/generate` goes to the router when there is one, else to the engine with the fewest requests
    in flight. An engine that cannot be reached is taken out of rotation and reported through
    `on_engine_down(url)` (the fleet restarts it); `mark_up(url)` brings it back. `api_key` and
    `admin_api_key` are the engines' `--api-key` and `--admin-api-key`; `busy_retries` bounds the
    retries of a `/generate` the engine refused as busy.
    """

    def __init__(
        self,
        worker_urls: list[str],
        *,
        router_url: str | None = None,
        concurrency_per_engine: int = 64,
        on_engine_down: Callable[[str], Any] | None = None,
        api_key: str | None = None,
        admin_api_key: str | None = None,
        busy_retries: int = 10,
    ):
        if not worker_urls:
            raise ValueError("an engine session needs at least one engine URL")
        self.worker_urls = [u.rstrip("/") for u in worker_urls]
        self.router_url = router_url.rstrip("/") if router_url else None
        self.concurrency_per_engine = concurrency_per_engine
        self.on_engine_down = on_engine_down
        self.api_key = api_key
        self.admin_api_key = admin_api_key
        self.busy_retries = busy_retries
        self.busy_answers = 0  # /generate calls the engines refused as busy (each retried or given up)
        self.session: aiohttp.ClientSession | None = None
        self.in_flight = dict.fromkeys(self.worker_urls, 0)
        self.down: set[str] = set()
        self._capacity: _Capacity | None = None
        self._up_event: asyncio.Event | None = None

    async def __aenter__(self) -> EngineSession:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
        self.session = aiohttp.ClientSession(connector=connector)
        self._capacity = _Capacity(self.concurrency_per_engine * len(self.worker_urls))
        self._up_event = asyncio.Event()
        self._up_event.set()
        return self

    async def __aexit__(self, *exc) -> None:
        if self.session is not None:
            await self.session.close()

    def _opened(self) -> tuple[aiohttp.ClientSession, _Capacity, asyncio.Event]:
        """The HTTP session, the capacity and the engine-up event, which `async with` creates."""
        if self.session is None or self._capacity is None or self._up_event is None:
            raise RuntimeError(
                f"EngineSession for {self.worker_urls} used before it was opened: use it inside `async with`"
            )
        return self.session, self._capacity, self._up_event

    def client(self, url: str) -> EngineClient:
        return EngineClient(
            url,
            self._opened()[0],
            self.api_key,
            admin_api_key=self.admin_api_key,
            busy_retries=self.busy_retries,
            on_busy=self._count_busy,
        )

    @property
    def takes_batches(self) -> bool:
        """Whether the rollout may send a group's samples as one batched `/generate` (SGLang's list of
        prompts): yes when the session spreads requests over the engines itself; through a router, which
        spreads requests over the engines, each sample goes as a request of its own."""
        return self.router_url is None

    def _count_busy(self) -> None:
        self.busy_answers += 1

    @property
    def alive_urls(self) -> list[str]:
        return [u for u in self.worker_urls if u not in self.down]

    def mark_down(self, url: str) -> None:
        if url in self.down or url not in self.in_flight:
            return
        self.down.add(url)
        logger.warning("engine %s is down; its requests go to the other engines", url)
        if not self.alive_urls:
            self._opened()[2].clear()
        if self.on_engine_down is not None:
            self.on_engine_down(url)

    def mark_up(self, url: str) -> None:
        self.down.discard(url)
        self._opened()[2].set()

    async def _pick(self) -> str:
        while not self.alive_urls:
            await self._opened()[2].wait()
        return min(self.alive_urls, key=lambda u: self.in_flight[u])

    async def generate(
        self, payload: dict[str, Any], *, timeout: float | None = None
    ) -> tuple[dict[str, Any], str]:
        """Send one request; returns (response, url of the engine that served it).

        A batched request (a list of prompts: `input_ids` or `text`) counts as one request per prompt
        against `concurrency_per_engine` and the engines' load, and answers a list.

        Raises EngineUnavailable only when the chosen engine is unreachable (it is marked down
        first, so a retry goes elsewhere); EngineTimeout when the request took too long; EngineBusy
        when the engine refused it as busy through every retry (it stays up).
        """
        weight = _prompts_in(payload)
        async with self._opened()[1].take(weight):
            if self.router_url is not None:
                url, target = self.router_url, self.router_url
            else:
                url = await self._pick()
                target = url
            if url in self.in_flight:
                self.in_flight[url] += weight
            try:
                response = await self.client(target).generate(payload, timeout=timeout)
            except EngineUnavailable:
                if url in self.in_flight:
                    self.mark_down(url)
                raise
            finally:
                if url in self.in_flight:
                    self.in_flight[url] -= weight
        return response, url

    async def for_each_engine(
        self, action: Callable[[EngineClient], Any], *, skip_down: bool = True
    ) -> list[Any]:
        """Run a control call on every engine concurrently (the router does not forward them)."""
        urls = self.alive_urls if skip_down else self.worker_urls
        return await asyncio.gather(*(action(self.client(u)) for u in urls))

    async def abort_all(self) -> None:
        async def _abort(client: EngineClient) -> None:
            try:
                await client.abort(abort_all=True)
            except EngineUnavailable:
                self.mark_down(client.url)

        await self.for_each_engine(_abort)
