"""remote_rm: a reward served over HTTP, with retries inside a bounded total time.

One `aiohttp` connection pool per event loop is shared by every call (connections are reused
across samples). Connection errors, dropped connections, 429 and 5xx answers are retried with
exponential backoff and jitter; 4xx answers and bodies that are not a reward are not, since
retrying cannot fix them. Nothing outlives the total time limit: the backoff sleeps and the
requests all come out of the same budget.

The server's token comes from the environment variable that `rm_api_key_env` names and goes out
as `Authorization: Bearer <token>`. Messages and logs show the URL with its credentials masked
(`slime_wf.redact`): they end up in logs, in `sample.metadata["rm_failure"]` and in the run store.
"""

from __future__ import annotations

import asyncio
import json
import logging
import numbers
import os
import random
from typing import Any

import aiohttp

from slime_wf.redact import redact_url

logger = logging.getLogger(__name__)


class RemoteRewardError(RuntimeError):
    """The reward server answered with something that retrying will not fix."""


class RemoteRewardTimeout(TimeoutError):
    """The reward server gave no usable answer within the time limit."""


class _Retryable(Exception):
    pass


class RemoteRewardClient:
    """POSTs `{"prompt", "response", "label"}` and returns the JSON answer (a number or an object)."""

    def __init__(
        self, *, max_connections: int = 256, backoff_base: float = 0.1, backoff_cap: float = 4.0
    ) -> None:
        self.max_connections = max_connections
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closer: asyncio.Task | None = None

    def _session_for_this_loop(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            if self._session is not None and not self._session.closed:
                # The loop that owned it is gone (or another one took over); its sockets die with it.
                self._session.detach()
            connector = aiohttp.TCPConnector(limit=self.max_connections, enable_cleanup_closed=True)
            self._session = aiohttp.ClientSession(connector=connector)
            self._loop = loop
            self._closer = loop.create_task(_close_at_loop_end(self._session))
        return self._session

    def backoff(self, attempt: int) -> float:
        """Seconds before retry number `attempt` (0-based): exponential, capped, jittered."""
        ceiling = min(self.backoff_cap, self.backoff_base * (2**attempt))
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    async def score(
        self, url: str | None, payload: dict[str, Any], timeout: float, *, token_env: str | None = None
    ) -> tuple[Any, int]:
        """(reward, attempts). Raises RemoteRewardTimeout or RemoteRewardError.

        `token_env`: the name of the environment variable that holds the server's bearer token."""
        if not url:
            raise RemoteRewardError("rm_type remote_rm needs rm_url (the URL of the reward server)")
        headers = bearer_headers(token_env)
        shown = redact_url(url)
        session = self._session_for_this_loop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        attempt, last_error = 0, "no attempt finished"
        while True:
            attempt += 1
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    return await self._post_once(session, url, shown, payload, headers), attempt
            except TimeoutError:
                last_error = f"attempt {attempt} was still running at the time limit"
                break
            except _Retryable as err:
                last_error = str(err)
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as err:
                last_error = redact_url(f"{type(err).__name__}: {err}")  # some aiohttp errors quote the URL
            delay = min(self.backoff(attempt - 1), deadline - loop.time())
            if delay <= 0:
                break
            logger.info("remote_rm %s: %s; retry %d in %.2f s", shown, last_error, attempt, delay)
            await asyncio.sleep(delay)
        raise RemoteRewardTimeout(
            f"remote_rm {shown}: no answer within {timeout:g} s ({attempt} attempt(s); {last_error})"
        )

    async def _post_once(
        self,
        session: aiohttp.ClientSession,
        url: str,
        shown: str,
        payload: dict[str, Any],
        headers: dict[str, str] | None,
    ) -> Any:
        try:
            async with session.post(url, json=payload, headers=headers) as resp:
                body = await resp.read()
                if resp.status == 429 or resp.status >= 500:
                    raise _Retryable(f"HTTP {resp.status}: {body[:200]!r}")
                if resp.status in (401, 403):
                    hint = (
                        "set reward.rm_api_key_env"
                        if headers is None
                        else "check the token in reward.rm_api_key_env"
                    )
                    raise RemoteRewardError(
                        f"remote_rm {shown}: HTTP {resp.status} (not authorized; {hint}): {body[:200]!r}"
                    )
                if resp.status >= 400:
                    raise RemoteRewardError(f"remote_rm {shown}: HTTP {resp.status}: {body[:500]!r}")
        except aiohttp.InvalidURL:  # its message is the URL itself, unmasked
            raise RemoteRewardError(f"remote_rm {shown}: reward.rm_url is not a valid http(s) URL") from None
        except ValueError as err:  # e.g. credentials both in the URL and in a token
            raise RemoteRewardError(
                f"remote_rm {shown}: the request could not be made: {redact_url(str(err))}"
            ) from None
        try:
            reward = json.loads(body)
        except ValueError:
            raise RemoteRewardError(f"remote_rm {shown}: the answer is not JSON: {body[:200]!r}") from None
        if isinstance(reward, bool) or not isinstance(reward, numbers.Number | dict):
            raise RemoteRewardError(
                f"remote_rm {shown}: the answer must be a number or a JSON object, got {type(reward).__name__}: "
                f"{str(reward)[:200]}"
            )
        return reward

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if self._closer is not None and self._loop is asyncio.get_running_loop():
            self._closer.cancel()
        if session is None or session.closed:
            return
        if self._loop is asyncio.get_running_loop():
            await session.close()
        else:
            session.detach()


def bearer_headers(token_env: str | None) -> dict[str, str] | None:
    """`Authorization: Bearer <token>` with the token from the variable `token_env` names (None: no header)."""
    if not token_env:
        return None
    token = os.environ.get(token_env)
    if not token:
        raise RemoteRewardError(
            f"reward.rm_api_key_env names the environment variable {token_env}, which is not set (or empty) in this "
            "process: export the reward server's token under that name where the campaign runs"
        )
    return {"Authorization": f"Bearer {token}"}


async def _close_at_loop_end(session: aiohttp.ClientSession) -> None:
    """Close the session when its loop shuts down: asyncio.run cancels the tasks still pending
    at its end and lets them finish, which runs this finally block inside the loop."""
    try:
        await asyncio.get_running_loop().create_future()
    finally:
        if not session.closed:
            await session.close()
