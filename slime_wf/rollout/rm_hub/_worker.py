"""The grader worker process: run chunks of tasks, report where it is, send results in bursts.

It writes the sequence number and start time of the task it is inside into a shared-memory
slot (see pool.py for why), and it exits on its own when the pool's process is gone. The pool
holds a `WorkerHandle` per worker.
"""

from __future__ import annotations

import gc
import importlib
import multiprocessing.connection
import os
import pickle
import signal
import threading
import time
import traceback
from multiprocessing import forkserver
from typing import Any

OK, ERROR, TIMEOUT, CRASH = "ok", "error", "timeout", "crash"
UNREADABLE = "unreadable"  # the chunk's input could not be unpickled here
READY = "ready"  # a worker's first message
# a start waits on the fork server and the graders' imports: on a loaded machine, long
READY_TIMEOUT_S = 300.0
RESULT_FLUSH_S = 0.005


class WorkerStartError(RuntimeError):
    """A grader worker ended (or hung) before it was ready to take tasks."""


def _resolve_target(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _exit_with_parent(owner_pid: int) -> None:
    """Leave when the pool's process is gone, even while stuck in a grader (no orphans).

    The fork server (this process's parent) exits when the pool's process is gone. On Linux the
    kernel then kills this one (PR_SET_PDEATHSIG), which works even inside a C call that holds
    the GIL for minutes (a huge sympy integer product); elsewhere a watcher thread does it.
    """
    fork_server = os.getppid()
    # The fork server exits when every holder of its "alive" pipe is gone, and hands a copy to
    # each child it forks; the worker gives its copy back so that the pipe closes with the owner.
    alive_fd = getattr(forkserver._forkserver, "_forkserver_alive_fd", None)
    if alive_fd is not None:
        try:
            os.close(alive_fd)
        except OSError:
            pass
        # a private CPython attribute that typeshed does not declare
        forkserver._forkserver._forkserver_alive_fd = None  # type: ignore[attr-defined]
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL, 0, 0, 0) == 0 and os.getppid() == fork_server:  # 1: PR_SET_PDEATHSIG
            return
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(owner_pid, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:
                pass
            if os.getppid() != fork_server:
                os._exit(0)

    threading.Thread(target=watch, name="rm-worker-parent-watch", daemon=True).start()


def _picklable(item: tuple) -> tuple:
    try:
        pickle.dumps(item)
        return item
    except Exception as err:
        seq, _, value, seconds = item
        return (
            seq,
            ERROR,
            f"the result {type(value).__name__} cannot be sent back (not picklable): {err}",
            seconds,
        )


def _send(conn: Any, results: list[tuple]) -> None:
    try:
        conn.send(results)
    except (pickle.PicklingError, TypeError, AttributeError):
        conn.send([_picklable(item) for item in results])


def worker_main(conn: Any, slot: Any, owner_pid: int, preload: tuple[str, ...] = ()) -> None:
    # Ctrl-C reaches the whole process group; the pool's owner decides what to do about it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent(owner_pid)
    # Normally a no-op (the fork server imported them), unless someone else started the fork
    # server first: then the imports happen here, before any task's clock starts.
    for module in preload:
        try:
            importlib.import_module(module)
        except Exception:  # the task that needs it will report the error
            pass
    # The imported graders live as long as the worker: keep them out of the garbage collector's
    # sweeps (which would also copy every page shared with the fork server).
    gc.freeze()
    conn.send(READY)  # start_worker waits for this: a process that ends before it never took a task
    targets: dict[str, Any] = {}
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        seqs, blob = chunk
        try:  # apart from recv, so that input the worker cannot read does not kill the worker
            tasks = pickle.loads(blob)
        except Exception as err:
            _send(
                conn,
                [(seq, UNREADABLE, f"the worker cannot read the task's input: {err!r}", 0.0) for seq in seqs],
            )
            continue
        results: list[tuple] = []
        monotonic = time.monotonic
        last_flush = monotonic()
        for seq, target, payload in tasks:
            slot[0] = float(seq)
            start = monotonic()
            slot[1] = start
            try:
                fn = targets.get(target)
                if fn is None:
                    fn = targets[target] = _resolve_target(target)
                status, value = OK, fn(*payload)
            except BaseException as err:  # a grader calling sys.exit is still just an error
                text = "".join(traceback.format_exception(type(err), err, err.__traceback__, limit=-8))
                status, value = ERROR, text.strip()
            end = monotonic()
            slot[1] = 0.0
            results.append((seq, status, value, end - start))
            if end - last_flush >= RESULT_FLUSH_S:
                _send(conn, results)
                results = []
                last_flush = end
        if results:
            _send(conn, results)


class WorkerHandle:
    """The pool's side of one worker: its process, its pipe, its slot, its tasks in flight."""

    __slots__ = ("process", "conn", "slot", "inflight", "dead")

    def __init__(self, process: Any, conn: Any, slot: Any) -> None:
        self.process, self.conn, self.slot = process, conn, slot
        self.inflight: dict[int, Any] = {}  # seq -> the pool's task
        self.dead = False

    def running(self) -> tuple[int, float] | None:
        """(seq, start) of the task the worker is inside right now, read consistently."""
        for _ in range(3):
            seq, start, seq_again = self.slot[0], self.slot[1], self.slot[0]
            if seq == seq_again:
                return (int(seq), start) if start > 0 else None
        return None


def start_worker(
    ctx: Any, preload: tuple[str, ...], ready_timeout_s: float = READY_TIMEOUT_S
) -> WorkerHandle:
    """Start a worker from the multiprocessing context `ctx` (the fork server's) and wait until it is
    ready; raises `WorkerStartError` when it ends or hangs first. A worker that cannot start would die
    with every task it is given, and so would each replacement: that is an error of the setup, not of
    the tasks."""
    parent_conn, child_conn = ctx.Pipe(duplex=True)
    slot = ctx.RawArray("d", 2)
    process = ctx.Process(
        target=worker_main, args=(child_conn, slot, os.getpid(), preload), name="rm-grader", daemon=True
    )
    process.start()
    child_conn.close()
    ready = multiprocessing.connection.wait([parent_conn, process.sentinel], timeout=ready_timeout_s)
    try:
        message = parent_conn.recv() if parent_conn in ready else None
    except (EOFError, OSError):
        message = None
    if message == READY:
        return WorkerHandle(process, parent_conn, slot)
    parent_conn.close()
    if not ready:
        process.kill()
        process.join()
        raise WorkerStartError(f"a grader worker process was not ready within {ready_timeout_s:g} s")
    process.join(10.0)  # its pipe closed or it ended: either way it is ending (the exit code follows)
    if process.exitcode is None:
        process.kill()
        process.join()
    raise WorkerStartError(
        f"a grader worker process ended before it was ready (exit code {process.exitcode}); its own error is "
        "in this process's output above. A common cause: a script that starts the campaign when it is "
        "imported. Worker processes import the main module again (Python's forkserver start method), so "
        'a script must run the campaign under `if __name__ == "__main__":`.'
    )
