"""Helpers for the servers slime-wf starts as subprocesses (engines, the router; in the tests also
S3 and Prefect): a free port to give one, and a wait for it to come up that stops as soon as its
process exits, so a server that crashed at start-up is reported at once rather than at the timeout.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class ProcessExited(RuntimeError):
    """The process a `wait_until` watched exited before the condition held."""

    def __init__(self, what: str, returncode: int):
        super().__init__(f"{what}: the process exited with code {returncode}")
        self.returncode = returncode


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now. Another process may take it before the caller binds it:
    a server started on it that fails to bind exits, which `wait_until(process=...)` reports."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until(
    condition: Callable[[], T],
    what: str,
    *,
    timeout_s: float,
    interval_s: float = 0.2,
    process: subprocess.Popen | None = None,
) -> T:
    """Poll `condition()` until it returns something truthy, and return that.

    Raises `ProcessExited` as soon as `process` (the server being waited for) has exited, and
    `TimeoutError` naming `what` after `timeout_s`. The deadline only stops a hang: give it
    generously, since a loaded machine is slow.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and process.poll() is not None:
            raise ProcessExited(what, process.returncode)
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"still waiting for {what} after {timeout_s:g} s")
        time.sleep(interval_s)
