"""Engine fleets: launching, attaching to, health-checking and restarting inference servers.

A fleet is N servers that speak SGLang's HTTP API: real SGLang (`python -m sglang.launch_server`)
on GPUs, or the local CPU server (`python -m slime_wf.rollout.local_server`), optionally behind
`sglang-router`. Servers are child processes in their own process groups, with their output in
`<log_dir>/engine-<i>.log`. A dead server is restarted on the same port with the weights it was
last given, so a rollout can go on.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from slime_wf.rollout.engine_client import EngineSession

logger = logging.getLogger(__name__)


class EngineStartError(RuntimeError):
    """An engine or the router did not come up; the message carries the end of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError, TimeoutError):
        return 0


def _log_tail(path: str | None, n: int = 3000) -> str:
    if not path or not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - n))
        return f.read().decode(errors="replace")


@dataclass
class Engine:
    url: str
    port: int
    cmd: list[str] | None = None  # None: attached, not ours to restart
    log_path: str | None = None
    process: subprocess.Popen | None = None
    restarts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def managed(self) -> bool:
        return self.cmd is not None


class EngineFleet:
    """The engines a campaign generates with; a context manager that shuts them down."""

    def __init__(self, args: Any, model_path: str, *, log_dir: str, weight_version: str = "0"):
        self.args = args
        self.model_path = model_path
        self.weight_version = str(weight_version)
        self.log_dir = log_dir
        self.engines: list[Engine] = []
        self.router: Engine | None = None
        self._restart_tasks: set[asyncio.Task] = set()
        atexit.register(self.shutdown)

    # ---- launching -----------------------------------------------------------------------

    def _server_cmd(self, port: int) -> list[str]:
        a = self.args
        host = a.engine_host
        if a.engine_type == "local":
            threads = a.local_engine_threads or max(1, (os.cpu_count() or 1) // a.num_engines)
            return [
                sys.executable, "-m", "slime_wf.rollout.local_server", "--model-path", self.model_path,
                "--host", host, "--port", str(port), "--dtype", a.local_engine_dtype,
                "--num-threads", str(threads), "--weight-version", self.weight_version, "--parent-pid", str(os.getpid()),
            ]
        cmd = [
            sys.executable, "-m", "sglang.launch_server", "--model-path", self.model_path, "--host", host,
            "--port", str(port), "--tp-size", str(a.rollout_num_gpus_per_engine),
            "--weight-version", self.weight_version,
        ]
        if a.sglang_mem_fraction_static is not None:
            cmd += ["--mem-fraction-static", str(a.sglang_mem_fraction_static)]
        for key, value in a.sglang_server_args.items():
            flag = "--" + str(key).replace("_", "-")
            if value is True:
                cmd.append(flag)
            elif value not in (False, None):
                cmd += [flag, str(value)]
        return cmd

    def _spawn(self, engine: Engine) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        log = open(engine.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        env = dict(os.environ)
        if engine.cmd[2] == "sglang.launch_server" and "CUDA_VISIBLE_DEVICES" not in env:
            # one GPU group per engine, in launch order
            tp = self.args.rollout_num_gpus_per_engine
            first = engine.extra["index"] * tp
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + i) for i in range(tp))
        engine.process = subprocess.Popen(
            engine.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        log.close()

    def _wait_healthy(self, engine: Engine, what: str, path: str = "/health_generate") -> None:
        deadline = time.monotonic() + self.args.engine_startup_timeout
        while time.monotonic() < deadline:
            if engine.process is not None and engine.process.poll() is not None:
                raise EngineStartError(
                    f"{what} at {engine.url} exited with code {engine.process.returncode} while starting.\n"
                    f"command: {' '.join(engine.cmd)}\nlog ({engine.log_path}):\n{_log_tail(engine.log_path)}"
                )
            if _get(engine.url + path, timeout=self.args.engine_health_timeout) == 200:
                return
            time.sleep(0.25)
        raise EngineStartError(
            f"{what} at {engine.url} was not healthy after {self.args.engine_startup_timeout} s "
            f"(engine.engine_startup_timeout).\nlog ({engine.log_path}):\n{_log_tail(engine.log_path)}"
        )

    def start(self) -> EngineFleet:
        a = self.args
        if a.engine_urls:
            for url in a.engine_urls:
                engine = Engine(url=url.rstrip("/"), port=int(url.rsplit(":", 1)[-1].split("/")[0]))
                if _get(engine.url + "/health", timeout=a.engine_health_timeout) != 200:
                    raise EngineStartError(
                        f"engine {engine.url} (engine.engine_urls) is unreachable or unhealthy: GET /health failed. "
                        "Start it first, or leave engine_urls empty to let slime-wf launch engines."
                    )
                self.engines.append(engine)
        else:
            for i in range(a.num_engines):
                port = a.engine_base_port + i if a.engine_base_port else free_port(a.engine_host)
                engine = Engine(
                    url=f"http://{a.engine_host}:{port}", port=port, cmd=self._server_cmd(port),
                    log_path=os.path.join(self.log_dir, f"engine-{i}.log"), extra={"index": i},
                )
                self._spawn(engine)
                self.engines.append(engine)
            logger.info("launching %d %s engine(s): %s", len(self.engines), a.engine_type, self.urls)
            for i, engine in enumerate(self.engines):
                self._wait_healthy(engine, f"engine {i}")
        if a.use_router:
            self._start_router()
        return self

    def _start_router(self) -> None:
        a = self.args
        port = free_port(a.engine_host)
        cmd = [
            sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *self.urls,
            "--policy", a.router_policy, "--host", a.engine_host, "--port", str(port),
        ]
        self.router = Engine(
            url=f"http://{a.engine_host}:{port}", port=port, cmd=cmd, log_path=os.path.join(self.log_dir, "router.log")
        )
        self.router.extra["index"] = -1
        self._spawn(self.router)
        self._wait_healthy(self.router, "sglang-router", path="/health")

    # ---- state ---------------------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        return [e.url for e in self.engines]

    @property
    def router_url(self) -> str | None:
        return self.router.url if self.router else None

    def set_weights(self, model_path: str, weight_version: str) -> None:
        """Record what the engines now serve, so a restarted engine serves the same."""
        self.model_path = model_path
        self.weight_version = str(weight_version)
        for engine in self.engines:
            if engine.managed:
                engine.cmd = self._server_cmd(engine.port)

    def check_health(self) -> dict[str, bool]:
        return {
            e.url: _get(e.url + "/health_generate", timeout=self.args.engine_health_timeout) == 200
            for e in self.engines
        }

    # ---- restarts ------------------------------------------------------------------------

    def restart(self, url: str) -> None:
        """Restart the engine at `url` on the same port with the current weights (blocking)."""
        engine = next(e for e in self.engines if e.url == url)
        if not engine.managed:
            raise EngineStartError(f"engine {url} is external (engine.engine_urls); slime-wf cannot restart it")
        if engine.restarts >= self.args.engine_max_restarts:
            raise EngineStartError(
                f"engine {url} died again after {engine.restarts} restart(s) (engine.engine_max_restarts); see "
                f"{engine.log_path}:\n{_log_tail(engine.log_path)}"
            )
        engine.restarts += 1
        logger.warning("restarting engine %s (restart %d) with weights %s", url, engine.restarts, self.model_path)
        self._kill(engine)
        self._spawn(engine)
        self._wait_healthy(engine, f"restarted engine {url}")

    def session(self, *, validate=None) -> EngineSession:
        """An `EngineSession` over this fleet whose dead engines are restarted in the background."""
        session: EngineSession

        def on_down(url: str) -> None:
            engine = next((e for e in self.engines if e.url == url), None)
            if engine is None or not engine.managed:
                return
            task = asyncio.get_running_loop().create_task(self._restart_async(session, url))
            self._restart_tasks.add(task)
            task.add_done_callback(self._restart_tasks.discard)

        session = EngineSession(
            self.urls,
            router_url=self.router_url,
            concurrency_per_engine=self.args.sglang_server_concurrency,
            on_engine_down=on_down,
            validate=validate,
        )
        return session

    async def _restart_async(self, session: EngineSession, url: str) -> None:
        try:
            await asyncio.to_thread(self.restart, url)
        except EngineStartError as err:
            logger.error("%s", err)
            return
        session.mark_up(url)

    async def wait_restarts(self) -> None:
        if self._restart_tasks:
            await asyncio.gather(*list(self._restart_tasks), return_exceptions=True)

    # ---- shutdown ------------------------------------------------------------------------

    @staticmethod
    def _kill(engine: Engine) -> None:
        proc = engine.process
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except (ProcessLookupError, PermissionError):
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)

    def shutdown(self) -> None:
        for engine in [*self.engines, *([self.router] if self.router else [])]:
            self._kill(engine)

    def __enter__(self) -> EngineFleet:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()
