"""Clients of the trainer: `LocalTrainer` (world size one, in this process) and `RemoteTrainer`
(a torchrun group running `slime_wf.training.service`), with the same methods; `make_trainer`
picks one, a `TrainerClient`. The wire protocol and the service side are described in `service.py`.

Size: one module over 400 lines because the two clients implement one protocol method by method;
keeping them together shows at each method how the in-process call and the group's request differ.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from slime_wf.training.trainer_group import (
    SERVICE_MODULE,
    STARTING_MARK,
    failure_summary,
    join_commands,
    log_tail,
    publish_generation,
    torchrun_command,
)
from slime_wf.types import Sample, write_samples_jsonl

if TYPE_CHECKING:
    from slime_wf.training.trainer import InitialWeights

logger = logging.getLogger(__name__)

AUTHKEY_ENV = "SLIME_WF_TRAINER_AUTHKEY"


class TrainerServiceError(RuntimeError):
    """The trainer service failed a command, or is gone."""


def trainer_status(trainer: Any) -> dict[str, Any]:
    """What `ping` answers: the trainer's optimizer step and last rollout id (and its critic's step)."""
    status = {"step": trainer.step, "rollout_id": trainer.rollout_id}
    if getattr(trainer, "critic", None) is not None:
        status["critic_step"] = trainer.critic.step
    return status


def _with_load(args: Any, load: str | os.PathLike[str] | None) -> dict[str, Any]:
    values = dict(args) if isinstance(args, dict) else dict(vars(args))
    if load is not None:
        values["load"] = str(load)
    return values


def _with_shape(
    args: Any, nnodes: int, nproc_per_node: int, rdzv_endpoint: str | None = None
) -> dict[str, Any]:
    """The settings with the group they run on, which the trainer checks its parallel sizes against."""
    return {
        **_with_load(args, None),
        "actor_num_nodes": nnodes,
        "actor_num_gpus_per_node": nproc_per_node,
        "trainer_rdzv_endpoint": rdzv_endpoint,
    }


class LocalTrainer:
    """A `Trainer` of world size one in this process, with the service's methods."""

    def __init__(self, args: Any, hf_checkpoint_dir: str | os.PathLike, *, threads: int | None = None):
        from slime_wf.training.trainer import Trainer

        self._args = _with_shape(args, 1, 1)
        self._hf_dir = str(hf_checkpoint_dir)
        self._threads = threads  # torch threads while training (None: the process's own)
        self.trainer = Trainer(self._args, self._hf_dir)

    @property
    def initial_weights(self) -> InitialWeights:
        return self.trainer.initial_weights

    def train(self, samples: Sequence[Sample | dict[str, Any]], rollout_id: int) -> dict[str, Any]:
        if self._threads is None:
            return self.trainer.train(list(samples), rollout_id)
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(self._threads)
        try:
            return self.trainer.train(list(samples), rollout_id)
        finally:
            torch.set_num_threads(before)

    def save(self, path: str | os.PathLike, rollout_id: int | None = None) -> str:
        return self.trainer.save(path, rollout_id)

    def load(self, path: str | os.PathLike) -> dict[str, Any]:
        return self.trainer.load(path)

    def export_hf(self, out_dir: str | os.PathLike, dtype: str | None = None) -> str:
        return self.trainer.export_hf(out_dir, dtype)

    def broadcast_weights(self, plan: dict[str, Any], request: dict[str, Any]) -> dict[str, float]:
        return self.trainer.broadcast_weights(plan, request)

    def close_weight_group(self) -> None:
        self.trainer.close_weight_group()

    def ping(self) -> dict[str, Any]:
        return trainer_status(self.trainer)

    def restart(self, from_checkpoint: str | os.PathLike | None = None) -> None:
        from slime_wf.training.trainer import Trainer

        self.trainer.shutdown()
        self.trainer = Trainer(_with_load(self._args, from_checkpoint), self._hf_dir)

    def shutdown(self) -> None:
        self.trainer.shutdown()

    def __enter__(self) -> LocalTrainer:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


class RemoteTrainer:
    """Client of a torchrun trainer service (protocol: `slime_wf.training.service`).

    `command_timeout` bounds each command (None: wait as long as the service lives); a command
    that runs past it stops the service, since its state is then unknown: restart it from a
    checkpoint. `threads_per_rank` sets OMP_NUM_THREADS of the ranks (default 1 on CPU).
    With `nnodes` > 1 this process's node is node 0 and each start waits up to `rdzv_timeout_s`
    at `rdzv_endpoint` for the other nodes (`trainer_group`); the commands they join with are logged.
    """

    def __init__(
        self,
        args: Any,
        hf_checkpoint_dir: str | os.PathLike,
        *,
        nproc_per_node: int,
        work_dir: str | os.PathLike | None = None,
        startup_timeout: float = 600.0,
        command_timeout: float | None = None,
        heartbeat_s: float = 60.0,
        threads_per_rank: int | None = None,
        nnodes: int = 1,
        rdzv_endpoint: str | None = None,
        rdzv_timeout_s: float = 900.0,
        log_path: str | os.PathLike | None = None,
    ):
        if nproc_per_node < 1 or nnodes < 1:
            raise ValueError(f"nproc_per_node and nnodes must be >= 1, got {nproc_per_node} and {nnodes}")
        if nnodes > 1 and not rdzv_endpoint:
            raise ValueError(
                f"a trainer group of {nnodes} nodes needs rdzv_endpoint (host:port of this node)"
            )
        self._args = _with_shape(args, nnodes, nproc_per_node, rdzv_endpoint)
        try:
            json.dumps(self._args)
        except TypeError as err:
            raise TypeError(
                f"RemoteTrainer: args must be JSON-serializable to reach the service ({err})"
            ) from None
        self._hf_dir = str(hf_checkpoint_dir)
        self.nproc_per_node, self.nnodes = nproc_per_node, nnodes
        self.rdzv_endpoint, self.rdzv_timeout_s = rdzv_endpoint, rdzv_timeout_s
        self._own_work_dir = work_dir is None
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="slime-wf-trainer-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._log_path = Path(log_path) if log_path is not None else self.work_dir / "service.log"
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        self.startup_timeout, self.command_timeout = startup_timeout, command_timeout
        self.heartbeat_s = heartbeat_s
        self.threads_per_rank = threads_per_rank
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection[Any, Any] | None = None
        self.pids: list[int] = []
        self._ready: dict[str, Any] = {}
        self._start(load=None)

    # ---- lifecycle ------------------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        return self._log_path

    @property
    def initial_weights(self) -> InitialWeights | None:
        """Where the policy's first weights came from (`trainer.InitialWeights`), as the service reported it."""
        from slime_wf.training.trainer import InitialWeights

        recorded = self._ready.get("initial_weights")
        return None if recorded is None else InitialWeights(**recorded)

    def join_commands(self) -> list[str]:
        """What each other node runs to join this group (none for one node)."""
        if self.nnodes == 1:
            return []
        assert self.rdzv_endpoint is not None, "__init__ refuses a group of several nodes without one"
        return join_commands(self.rdzv_endpoint, self.nnodes, self.nproc_per_node, self.rdzv_timeout_s)

    def _start(self, load: str | None) -> None:
        args_file = self.work_dir / "args.json"
        args_file.write_text(json.dumps(_with_load(self._args, load)))
        address_file = self.work_dir / "address.json"
        address_file.unlink(missing_ok=True)
        authkey = secrets.token_bytes(32)
        threads = self.threads_per_rank or int(os.environ.get("OMP_NUM_THREADS", "1"))
        env = {**os.environ, AUTHKEY_ENV: authkey.hex(), "OMP_NUM_THREADS": str(threads)}
        generation = secrets.token_hex(8) if self.nnodes > 1 else None
        cmd = [
            *torchrun_command(
                self.nproc_per_node,
                nnodes=self.nnodes,
                rdzv_endpoint=self.rdzv_endpoint,
                generation=generation,
                rdzv_timeout_s=self.rdzv_timeout_s,
            ),
            "-m",
            SERVICE_MODULE,
            "--args-json",
            str(args_file),
            "--hf-checkpoint",
            self._hf_dir,
            "--address-file",
            str(address_file),
            "--client-pid",
            str(os.getpid()),
            "--heartbeat-s",
            str(self.heartbeat_s),
        ]
        with open(self.log_path, "ab") as log:
            log.write(f"\n{STARTING_MARK} {' '.join(cmd)}\n".encode())
            self._proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        waiting = ""
        if generation is not None:
            commands = self.join_commands()
            for line in commands:
                logger.warning(
                    "trainer group: waiting at %s for the other %d nodes; join with: %s",
                    self.rdzv_endpoint,
                    self.nnodes - 1,
                    line,
                )
            waiting = (
                f" (waiting at {self.rdzv_endpoint} for the other {self.nnodes - 1} trainer nodes, which join "
                f"with: {' | '.join(commands)})"
            )
        published = generation is None
        deadline = time.monotonic() + self.startup_timeout + (self.rdzv_timeout_s if generation else 0.0)
        while not address_file.is_file():
            self._raise_if_dead("while starting" + waiting)
            if time.monotonic() > deadline:
                self._stop(force=True)
                raise TrainerServiceError(
                    f"trainer service did not listen in time{waiting}; "
                    f"log {self.log_path}:\n{log_tail(self.log_path)}"
                )
            if (
                not published
            ):  # only a group of several nodes publishes: it has a generation and (__init__) an endpoint
                assert self.rdzv_endpoint is not None and generation is not None
                published = publish_generation(self.rdzv_endpoint, generation)
            time.sleep(0.1)
        address = json.loads(address_file.read_text())
        try:
            self._conn = Client((address["host"], address["port"]), authkey=authkey)
            ready = self._receive("startup", max(deadline - time.monotonic(), 1.0))
        except BaseException:
            self._stop(force=True)
            raise
        self._ready = ready
        self.pids = list(ready["pids"])
        logger.info(
            "trainer service up: %d ranks (pids %s), step %s", len(self.pids), self.pids, ready["step"]
        )

    def _raise_if_dead(self, doing: str) -> None:
        if self._proc is None:
            raise TrainerServiceError("trainer service is not running (shut down); call restart()")
        code = self._proc.poll()
        if code is not None:
            self._close_conn()
            raise TrainerServiceError(
                f"trainer service died {doing}: torchrun exited with code {code} (a rank failed or was killed: "
                f"{failure_summary(self.log_path) or 'see the log'}); restart it with restart(from_checkpoint=...). "
                f"Last lines of {self.log_path}:\n{log_tail(self.log_path)}"
            )

    def _connection_lost(self, doing: str, grace_s: float = 60.0) -> NoReturn:
        """Rank 0 closed the connection: torchrun is (or soon will be) tearing the group down.
        Wait for its exit to report how it ended; a group that lingers is stopped."""
        assert self._proc is not None, "only called while talking to a started service"
        try:
            self._proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        self._raise_if_dead(doing)
        self._stop(force=True)
        raise TrainerServiceError(
            f"trainer service closed the connection {doing} and did not exit within {grace_s}s; it was stopped. "
            f"Last lines of {self.log_path}:\n{log_tail(self.log_path)}"
        )

    def _close_conn(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except OSError:
                pass
            self._conn = None

    def _stop(self, force: bool, timeout: float = 60.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if not force and self._conn is not None and proc.poll() is None:
            try:
                self._conn.send_bytes(json.dumps({"cmd": "shutdown"}).encode())
                proc.wait(timeout=timeout)
            except (OSError, EOFError, subprocess.TimeoutExpired):
                pass
        self._close_conn()
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)

    def restart(self, from_checkpoint: str | os.PathLike | None = None) -> None:
        """Stop the service (whatever its state) and start a fresh one, resuming from
        `from_checkpoint` (a checkpoint or a folder of them) when given."""
        self._stop(force=True)
        self._start(load=None if from_checkpoint is None else str(from_checkpoint))

    def shutdown(self) -> None:
        self._stop(force=False)
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> RemoteTrainer:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self) -> None:
        if getattr(self, "_proc", None) is not None:
            try:
                self._stop(force=True)
            except Exception:  # interpreter shutdown: best effort only
                pass

    # ---- commands -------------------------------------------------------------------------

    def _receive(self, what: str, timeout: float | None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        conn = self._conn
        assert conn is not None, "callers send on the connection first, or have just opened it"
        while True:
            try:
                if conn.poll(0.2):
                    message = json.loads(conn.recv_bytes())
                    if message.get(
                        "nonfinite"
                    ):  # the user must change something: not a fault to recover from
                        from slime_wf.training.nonfinite import NonFiniteTrainingError

                        detail = message["nonfinite"]
                        raise NonFiniteTrainingError(detail.pop("message"), **detail)
                    if not message["ok"]:
                        raise TrainerServiceError(f"trainer service failed {what}:\n{message['error']}")
                    return message["result"]
            except (EOFError, OSError):
                self._connection_lost(f"during {what}")
            self._raise_if_dead(f"during {what}")
            if deadline is not None and time.monotonic() > deadline:
                self._stop(force=True)
                raise TrainerServiceError(
                    f"trainer service gave no answer to {what} within {timeout}s and was "
                    f"stopped; restart it from a checkpoint. Log {self.log_path}"
                )

    def _call(self, command: dict[str, Any]) -> Any:
        self._raise_if_dead(f"before {command['cmd']}")
        assert self._conn is not None, "a live service has its connection (_raise_if_dead closes it on exit)"
        try:
            self._conn.send_bytes(json.dumps(command).encode())
        except (OSError, EOFError):
            self._connection_lost(f"sending {command['cmd']}")
        return self._receive(command["cmd"], self.command_timeout)

    def train(self, samples: Sequence[Sample | dict[str, Any]], rollout_id: int) -> dict[str, Any]:
        as_samples = [s if isinstance(s, Sample) else Sample.from_dict(s) for s in samples]
        path = write_samples_jsonl(as_samples, self.work_dir / f"samples-{int(rollout_id):06d}.jsonl")
        try:
            return self._call({"cmd": "train", "samples_path": str(path), "rollout_id": int(rollout_id)})
        finally:
            path.unlink(missing_ok=True)

    def save(self, path: str | os.PathLike, rollout_id: int | None = None) -> str:
        return self._call({"cmd": "save", "path": str(path), "rollout_id": rollout_id})

    def load(self, path: str | os.PathLike) -> dict[str, Any]:
        return self._call({"cmd": "load", "path": str(path)})

    def export_hf(self, out_dir: str | os.PathLike, dtype: str | None = None) -> str:
        return self._call({"cmd": "export_hf", "out_dir": str(out_dir), "dtype": dtype})

    def broadcast_weights(self, plan: dict[str, Any], request: dict[str, Any]) -> dict[str, float]:
        """See `Trainer.broadcast_weights`; `plan` holds the engines' admin key, which stays in the command."""
        return self._call({"cmd": "broadcast_weights", "plan": plan, "request": request})

    def close_weight_group(self) -> None:
        self._call({"cmd": "close_weight_group"})

    def ping(self) -> dict[str, Any]:
        return self._call({"cmd": "ping"})


TrainerClient = LocalTrainer | RemoteTrainer
"""What `make_trainer` returns: the campaign talks to either through the same methods."""


def make_trainer(
    args: Any,
    hf_checkpoint_dir: str | os.PathLike[str],
    *,
    nproc_per_node: int | None = None,
    local_threads: int | None = None,
    **remote_options: Any,
) -> TrainerClient:
    """A `LocalTrainer` for a world of one, a `RemoteTrainer` (torchrun) for more. The group is the
    settings' `actor_num_nodes` x `actor_num_gpus_per_node` (a campaign's), else one node of
    `nproc_per_node` processes, by default the tensor-parallel size (one data-parallel replica).
    `local_threads`: the torch threads a `LocalTrainer` trains with (None: this process's own); the
    ranks of a group get `threads_per_rank` (in `remote_options`)."""
    values = args if isinstance(args, dict) else vars(args)
    nnodes = int(values.get("actor_num_nodes") or 1)
    if nproc_per_node is None:
        nproc_per_node = int(
            values.get("actor_num_gpus_per_node") or values.get("tensor_model_parallel_size") or 1
        )
    if nnodes * nproc_per_node == 1:
        return LocalTrainer(args, hf_checkpoint_dir, threads=local_threads)
    if nnodes > 1:
        remote_options.setdefault("rdzv_endpoint", values.get("trainer_rdzv_endpoint"))
        remote_options.setdefault("rdzv_timeout_s", float(values.get("trainer_rdzv_timeout_s") or 900.0))
    return RemoteTrainer(
        args, hf_checkpoint_dir, nproc_per_node=nproc_per_node, nnodes=nnodes, **remote_options
    )
