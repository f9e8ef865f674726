"""Engine fleets: launching, attaching to, health-checking and restarting inference servers.

A fleet is N servers that speak SGLang's HTTP API: real SGLang (`python -m sglang.launch_server`)
on GPUs, or the local CPU server (`python -m slime_wf.engine_server`), optionally behind
`sglang-router`. Servers are child processes in their own process groups, with their output in
`<log_dir>/engine-<i>.log`. A dead server is restarted on the same port with the weights it was
last given, so a rollout can go on.

What the fleet starts ends with it, even when the launching process is killed: the local server
watches its launcher itself (`--parent-pid`); SGLang and the router run under
`slime_wf.rollout.parent_watch` (its docstring says why a watcher process, not PR_SET_PDEATHSIG).
A start that fails stops what it had started.

Launched engines take a per-start API key (SGLang's `--api-key` and `--admin-api-key`, the same
value: the campaign is the only client and needs both the generation and the control endpoints),
or the key in the environment variable `engine_api_key_env` names, which is also how attached
engines get theirs. The router gets it too (it then asks clients for it and sends it to the
engines). The key stays out of every command line, which any user of the machine can read: the
engines read it from a `--config` YAML file only the owner can read (SGLang's flag, which the
local server shares), the router from its environment. It never goes into a log, an error or the
config either.

Size: one module over 400 lines because `Engine` and `EngineFleet` share one lifecycle (launch,
key, health, restart on the same port, stop with the launcher); the parent watch and the HTTP client
are already apart (`parent_watch.py`, `engine_client.py`).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import secrets
import signal
import stat
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from slime_wf.redact import redact_url
from slime_wf.rollout.engine_client import EngineSession
from slime_wf.servers import ProcessExited, free_port, wait_until

logger = logging.getLogger(__name__)


def local_engine_threads(args: Any) -> int:
    """torch threads of each local engine: `local_engine_threads`, else this machine's cores shared by the
    engines; under `train_async` the engines get half of them, since the trainer computes at the same time
    (more threads than cores slowed both: 12m on 2 cores, 19.1 s per step against 12.3 with one each)."""
    if args.local_engine_threads:
        return int(args.local_engine_threads)
    cores = os.cpu_count() or 1
    if getattr(args, "train_async", False):
        cores = max(1, cores // 2)
    return max(1, cores // args.num_engines)


class EngineStartError(RuntimeError):
    """An engine or the router did not come up; the message carries the end of its log."""


KEY_FLAGS = ("--api-key", "--admin-api-key")
ROUTER_KEY_ENV = "SLIME_WF_ROUTER_API_KEY"
# sglang-router reads flags only; this adds its --api-key from the environment inside the process, where
# the process list does not show it
_ROUTER_MAIN = (
    f"import os, sys; key = os.environ.pop({ROUTER_KEY_ENV!r}, ''); sys.argv += ['--api-key', key] if key else []; "
    "from sglang_router.launch_router import main; main()"
)


def engine_gpus(args: Any, index: int, env: dict[str, str]) -> list[str]:
    """The GPUs (CUDA_VISIBLE_DEVICES entries) of launched SGLang engine `index`: one group of
    rollout_num_gpus_per_engine per engine, in launch order, from engine_base_gpu (default: after
    the trainer's GPUs on this node), counted within the CUDA_VISIBLE_DEVICES given to slime-wf."""
    tp = args.rollout_num_gpus_per_engine
    base = args.engine_base_gpu
    if base is None:
        base = getattr(args, "actor_num_gpus_per_node", 1)
    visible = env.get("CUDA_VISIBLE_DEVICES")
    devices = [d.strip() for d in visible.split(",") if d.strip()] if visible else None
    wanted = [base + index * tp + i for i in range(tp)]
    if devices is None:
        return [str(i) for i in wanted]
    if wanted[-1] >= len(devices):
        raise EngineStartError(
            f"SGLang engine {index} needs GPUs {wanted} (engine.engine_base_gpu={base}, rollout_num_gpus_per_engine="
            f"{tp}) but CUDA_VISIBLE_DEVICES={visible} has {len(devices)}; lower num_engines, or share the trainer's "
            "GPUs with engine_base_gpu: 0 and sglang_mem_fraction_static"
        )
    return [devices[i] for i in wanted]


def _get(url: str, timeout: float, api_key: str | None = None) -> int:
    # SGLang lets /health* through without a key; the bearer token is sent anyway for servers that do not
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError, TimeoutError):
        return 0


def shown(cmd: list[str]) -> str:
    """A command line for logs and errors: the API key masked, URLs redacted."""
    out = [redact_url(arg) for arg in cmd]
    for i, arg in enumerate(cmd[:-1]):
        if arg in KEY_FLAGS:
            out[i + 1] = "***"
    return " ".join(out)


def _open_private_log(path: str):
    """Append-only, readable by the owner alone: SGLang writes its server arguments, the key included,
    into its log."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, stat.S_IRUSR | stat.S_IWUSR)
    os.fchmod(fd, stat.S_IRUSR | stat.S_IWUSR)  # also a log left by an older run
    return os.fdopen(fd, "ab")


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
    watches_parent: bool = False  # the server exits with its launcher by itself (the local server)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def managed(self) -> bool:
        return self.cmd is not None


class EngineFleet:
    """The engines a campaign generates with; a context manager that shuts them down.

    `start()` on a started fleet raises: the old engines would keep running unseen. Call
    `shutdown()` first; a fleet that was shut down can be started again (with a new key).
    """

    def __init__(self, args: Any, model_path: str, *, log_dir: str, weight_version: str = "0"):
        self.args = args
        self.model_path = model_path
        self.weight_version = str(weight_version)
        self.log_dir = log_dir
        self.engines: list[Engine] = []
        self.router: Engine | None = None
        self.api_key: str | None = None
        self._key_file: str | None = None  # the engines' --config file that holds the key
        self.started = False
        self._restart_tasks: set[asyncio.Task] = set()
        # Called with a restarted engine's URL before it takes requests again: the `distributed` weight
        # sync gives it the current weights there (`weight_sync.fleet_sync`); if it raises, the engine is stopped.
        self.after_restart: Callable[[str], Any] | None = None

    # ---- launching -----------------------------------------------------------------------

    def _server_cmd(self, port: int) -> list[str]:
        a = self.args
        host = a.engine_host
        if a.engine_type == "local":
            threads = local_engine_threads(a)
            return [
                sys.executable,
                "-m",
                "slime_wf.engine_server",
                "--model-path",
                self.model_path,
                "--host",
                host,
                "--port",
                str(port),
                "--dtype",
                a.local_engine_dtype,
                "--num-threads",
                str(threads),
                "--min-gflop-per-thread",
                str(a.local_engine_min_gflop_per_thread),
                "--weight-version",
                self.weight_version,
                "--parent-pid",
                str(os.getpid()),
                # The session sends at most sglang_server_concurrency per engine, and the engine decodes
                # them together: a rollout's requests in one wave, not one wave per 64. The queue's bound is
                # for other clients (a router, slime's own client), who then get 503 + Retry-After and back off.
                "--max-running-requests",
                str(a.sglang_server_concurrency),
                "--max-queued-requests",
                str(4 * a.sglang_server_concurrency),
                *self._key_args(),
            ]
        cmd = [
            a.sglang_python or sys.executable,
            "-m",
            "sglang.launch_server",
            "--model-path",
            self.model_path,
            "--host",
            host,
            "--port",
            str(port),
            "--tp-size",
            str(a.rollout_num_gpus_per_engine),
            "--weight-version",
            self.weight_version,
            *self._key_args(),
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

    def _key_args(self) -> list[str]:
        return ["--config", self._key_file] if self._key_file else []

    def _spawn(self, engine: Engine, env: dict[str, str] | None = None) -> None:
        assert engine.cmd is not None and engine.log_path is not None  # only managed engines are spawned
        os.makedirs(self.log_dir, exist_ok=True)
        env = {**os.environ, **(env or {})}
        if engine.cmd[2] == "sglang.launch_server":
            env["CUDA_VISIBLE_DEVICES"] = ",".join(engine_gpus(self.args, engine.extra["index"], env))
        cmd = engine.cmd
        if not engine.watches_parent:
            cmd = [
                sys.executable,
                "-m",
                "slime_wf.rollout.parent_watch",
                "--parent-pid",
                str(os.getpid()),
                "--",
                *cmd,
            ]
        with _open_private_log(engine.log_path) as log:  # the child keeps its own copy of the descriptor
            engine.process = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )

    def _wait_healthy(self, engine: Engine, what: str, path: str = "/health_generate") -> None:
        def healthy() -> bool:
            return (
                _get(engine.url + path, timeout=self.args.engine_health_timeout, api_key=self.api_key) == 200
            )

        try:
            wait_until(
                healthy,
                f"{what} at {engine.url}",
                timeout_s=self.args.engine_startup_timeout,
                interval_s=0.25,
                process=engine.process,
            )
        except ProcessExited as err:
            raise EngineStartError(
                f"{what} at {engine.url} exited with code {err.returncode} while starting.\n"
                f"command: {shown(engine.cmd or [])}\nlog ({engine.log_path}):\n{self._tail(engine)}"
            ) from None
        except TimeoutError:
            raise EngineStartError(
                f"{what} at {engine.url} was not healthy after {self.args.engine_startup_timeout} s "
                f"(engine.engine_startup_timeout).\nlog ({engine.log_path}):\n{self._tail(engine)}"
            ) from None

    def _tail(self, engine: Engine) -> str:
        """The end of a server's log for an error message, without the key (SGLang logs its arguments)."""
        text = redact_url(_log_tail(engine.log_path))
        return text.replace(self.api_key, "***") if self.api_key else text

    def start(self, wait: bool = True) -> EngineFleet:
        """Launch (or attach to) the engines and, unless `wait` is false, wait for them and start the
        router (see `wait_ready`); on any failure, stop what was started."""
        if self.started:
            raise RuntimeError(
                f"this engine fleet is already started (engines {[redact_url(u) for u in self.urls]}); "
                "call shutdown() before starting it again"
            )
        self.started = True
        atexit.register(self.shutdown)  # a fleet that is never shut down still stops its servers at exit
        try:
            self._launch()
        except BaseException:
            self.shutdown()
            raise
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> EngineFleet:
        """Wait until every launched engine is healthy, then start the router; a failure stops them all.
        `start(wait=False)` then this lets a campaign build its trainer while the engines load."""
        try:
            for i, engine in enumerate(self.engines):
                if engine.managed:
                    self._wait_healthy(engine, f"engine {i}")
            if self.args.use_router and self.router is None:
                self._start_router()
        except BaseException:
            self.shutdown()
            raise
        return self

    def _launch(self) -> None:
        a = self.args
        self.api_key = self._resolve_api_key()
        if a.engine_urls:
            for url in a.engine_urls:
                engine = Engine(url=url.rstrip("/"), port=int(url.rsplit(":", 1)[-1].split("/")[0]))
                if _get(engine.url + "/health", timeout=a.engine_health_timeout, api_key=self.api_key) != 200:
                    raise EngineStartError(
                        f"engine {redact_url(engine.url)} (engine.engine_urls) is unreachable or unhealthy: GET /health "
                        "failed. Start it first, or leave engine_urls empty to let slime-wf launch engines."
                    )
                self.engines.append(engine)
        else:
            if self.api_key:
                os.makedirs(self.log_dir, exist_ok=True)
                fd, self._key_file = tempfile.mkstemp(
                    prefix="engine-keys-", suffix=".yaml", dir=self.log_dir
                )  # 0600
                with os.fdopen(fd, "w") as f:
                    f.write("".join(f"{flag[2:]}: {self.api_key}\n" for flag in KEY_FLAGS))
            for i in range(a.num_engines):
                port = a.engine_base_port + i if a.engine_base_port else free_port(a.engine_host)
                engine = Engine(
                    url=f"http://{a.engine_host}:{port}",
                    port=port,
                    cmd=self._server_cmd(port),
                    log_path=os.path.join(self.log_dir, f"engine-{i}.log"),
                    extra={"index": i},
                    watches_parent=a.engine_type == "local",
                )
                self.engines.append(engine)  # before the spawn: a failed start stops what is listed
                self._spawn(engine)
            logger.info("launching %d %s engine(s): %s", len(self.engines), a.engine_type, self.urls)

    def _resolve_api_key(self) -> str | None:
        name = self.args.engine_api_key_env
        if name:
            key = os.environ.get(name)
            if not key:
                raise EngineStartError(
                    f"engine.engine_api_key_env names the environment variable {name}, which is not set (or empty) "
                    "in this process: export the engines' API key under that name where the campaign runs."
                )
            return key
        # hex: a key never starts with '-', which a command line (SGLang's --config merge too) reads as a flag
        return None if self.args.engine_urls else secrets.token_hex(32)

    def _start_router(self) -> None:
        a = self.args
        # Without a key the router answers anyone who can reach it, so it stays on loopback then.
        host = a.engine_host if self.api_key else "127.0.0.1"
        port = free_port(host)
        cmd = [
            sys.executable,
            "-c",
            _ROUTER_MAIN,
            "--worker-urls",
            *self.urls,
            "--policy",
            a.router_policy,
            "--host",
            host,
            "--port",
            str(port),
            # its Prometheus exporter defaults to 0.0.0.0:29000: every interface, and one fixed port that the
            # routers of two campaigns on a machine would both want (the flags cannot turn it off)
            "--prometheus-host",
            "127.0.0.1",
            "--prometheus-port",
            str(free_port("127.0.0.1")),
        ]
        self.router = Engine(
            url=f"http://{host}:{port}", port=port, cmd=cmd, log_path=os.path.join(self.log_dir, "router.log")
        )
        self.router.extra["index"] = -1
        # the key is asked of the router's clients, and sent on to the engines
        self._spawn(self.router, env={ROUTER_KEY_ENV: self.api_key} if self.api_key else None)
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
            e.url: _get(
                e.url + "/health_generate", timeout=self.args.engine_health_timeout, api_key=self.api_key
            )
            == 200
            for e in self.engines
        }

    # ---- restarts ------------------------------------------------------------------------

    def restart(self, url: str) -> None:
        """Restart the engine at `url` on the same port with the current weights (blocking)."""
        engine = next(e for e in self.engines if e.url == url)
        if not engine.managed:
            raise EngineStartError(
                f"engine {redact_url(url)} is external (engine.engine_urls); slime-wf cannot restart it"
            )
        if engine.restarts >= self.args.engine_max_restarts:
            raise EngineStartError(
                f"engine {url} died again after {engine.restarts} restart(s) (engine.engine_max_restarts); see "
                f"{engine.log_path}:\n{self._tail(engine)}"
            )
        engine.restarts += 1
        logger.warning(
            "restarting engine %s (restart %d) with weights %s",
            url,
            engine.restarts,
            redact_url(self.model_path),
        )
        self._kill(engine)
        self._spawn(engine)
        self._wait_healthy(engine, f"restarted engine {url}")
        if self.after_restart is not None:
            try:
                self.after_restart(url)
            except Exception as err:
                self._kill(engine)  # it would serve the weights it was launched with, not the current ones
                raise EngineStartError(
                    f"restarted engine {redact_url(url)} was stopped again: giving it the current "
                    f"weights failed: {err}"
                ) from err

    def session(self) -> EngineSession:
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
            api_key=self.api_key,
            admin_api_key=self.api_key,  # the engines were given one key for both
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
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(
                proc.pid, signal.SIGKILL
            )  # what the server started and left behind (holding a port or a GPU)

    def shutdown(self) -> None:
        """Stop the router and every launched engine; a fleet that was shut down can be started again."""
        atexit.unregister(self.shutdown)
        for engine in [*([self.router] if self.router else []), *self.engines]:
            self._kill(engine)
        if self._key_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._key_file)
        self.engines, self.router, self.api_key, self._key_file, self.started = [], None, None, None, False

    def __enter__(self) -> EngineFleet:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()
