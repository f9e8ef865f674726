"""A `prefect server start` subprocess on 127.0.0.1 with its own PREFECT_HOME: for tests and benchmarks
that need a lasting server (schedules, deployments, history) rather than Prefect's temporary one."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from slime_wf.servers import ProcessExited, free_port, wait_until

logger = logging.getLogger(__name__)


def offline_env(home: str | os.PathLike) -> dict[str, str]:
    """Settings that keep a Prefect process local and quiet, with its state under `home`."""
    return {
        "PREFECT_HOME": str(Path(home).absolute()),
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
    }


@contextmanager
def local_prefect_server(
    home: str | os.PathLike, port: int | None = None, *, startup_timeout: float = 180.0
) -> Iterator[str]:
    """Start a Prefect server, wait for `/api/health`, yield its API URL, stop it on exit.

    Its log goes to `<home>/server.log`; a server that does not come up raises with the log's tail.
    """
    home = Path(home).absolute()
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    # the UI asks this address for its API; Prefect's default assumes port 4200
    env.update(offline_env(home), PREFECT_SERVER_UI_API_URL=api)
    log_path = home / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stopping it reaches every child
        )
    try:
        _wait_healthy(api, proc, log_path, startup_timeout)
        logger.info("Prefect server up at %s (home %s)", api, home)
        yield api
    finally:
        _stop(proc)


def _wait_healthy(api: str, proc: subprocess.Popen, log_path: Path, timeout: float) -> None:
    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    try:
        wait_until(healthy, f"the Prefect server at {api}", timeout_s=timeout, interval_s=0.5, process=proc)
    except (ProcessExited, TimeoutError) as err:
        why = (
            f"exited with {proc.returncode}"
            if isinstance(err, ProcessExited)
            else f"not healthy after {timeout:.0f} s"
        )
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"prefect server start {why} ({api}); log {log_path}:\n{tail}") from None


def _stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the server's group, SIGKILL what is left after `grace`; the leader is reaped last so
    that its pid, which names the group, cannot be reused by an unrelated process meanwhile."""
    if proc.returncode is None:
        _signal_group(proc.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: _exited_unreaped(proc.pid), "the Prefect server to exit", timeout_s=grace)
        _signal_group(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _exited_unreaped(pid: int) -> bool:
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None
