"""Worker processes for grading that no single input can stall.

Rule-based graders (sympy, regexes, math_verify) can take minutes or forever on a pathological
response, and a Python thread cannot be interrupted from outside. So grading runs in worker
processes, and a task that overruns its timeout gets its worker killed and replaced; the tasks
queued behind it in that worker go back to the queue.

Overhead matters as much as safety, since a rollout grades thousands of samples:

- Tasks travel in chunks (one message down), and results come back in bursts (one message per
  chunk, or every few milliseconds for latency), instead of one round trip per task. A worker
  gets its next chunk before it finishes the current one, so it seldom waits for the parent.
- Timeouts do not need per-task messages: each worker writes "task seq, started at" into a
  small shared-memory slot, and the pool's thread reads the slots to find the one overrunning
  task, even in the middle of a chunk.
- Workers come from a fork server that imported and warmed the graders once, so a replacement
  is a fork, not a fresh interpreter; and it is started by a helper thread, because on a busy
  machine even a fork can take a second, during which deadlines must still be enforced.
- Tasks of one affinity (one label: a GRPO group) stay in one worker, where the graders' own
  memos (sympy's cache, math_verify's parsers) see the group's repeated answers.

The pool is driven by one background thread, so it serves any event loop (and plain threads):
`submit` returns a `concurrent.futures.Future`, awaitable with `asyncio.wrap_future`.

Size: one module over 400 lines because the pool's parent thread, the workers' loop and the
shared-memory slots speak one private protocol; splitting them would make that protocol public.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import math
import multiprocessing
import os
import pickle
import selectors
import threading
import time
import weakref
from dataclasses import dataclass
from multiprocessing.context import ForkServerContext
from typing import Any

from ._worker import CRASH, ERROR, OK, TIMEOUT, UNREADABLE, WorkerHandle, WorkerStartError, start_worker

logger = logging.getLogger(__name__)

MAX_CHUNK = 256
# Chunks hold about this much work: enough to amortize a message, little enough that the
# workers finish a batch together instead of one waiting on another's long chunk.
CHUNK_SECONDS = 0.01
# ...and at least this much, however few tasks are left: the shares shrink towards the end of a
# batch, and below this a chunk's messages cost more than the idle time they could save.
MIN_CHUNK_SECONDS = 0.0025
WATCH_INTERVAL_S = 0.02
# A task whose worker died twice while it sat unfinished in the chunk is treated as the cause.
MAX_CRASH_RETRIES = 2
# Worker starts in a row that end before the worker is ready: then it is the setup (every start would
# end so), not a worker killed by bad luck, and the pool fails its tasks with the cause.
MAX_START_FAILURES = 3

DEFAULT_PRELOAD = ("slime_wf.rollout.rm_hub._preload",)


class PoolClosedError(RuntimeError):
    """The pool was closed while tasks were still waiting."""


@dataclass(slots=True, unsafe_hash=True)  # not frozen: one per task, and frozen ones are slow to build
class Outcome:
    """What became of one task: `value` is the result (ok) or a description of the failure."""

    status: str
    value: Any
    seconds: float


def default_num_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class _Batch:
    __slots__ = ("future", "outcomes", "remaining")

    def __init__(self, n: int) -> None:
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.outcomes: list[Outcome | None] = [None] * n
        self.remaining = n


class _Task:
    __slots__ = ("seq", "batch", "pos", "target", "payload", "timeout", "affinity", "crashes", "solo")

    def __init__(self, seq: int, batch: _Batch, pos: int, task: tuple) -> None:
        self.seq, self.batch, self.pos = seq, batch, pos
        self.target, self.payload, self.timeout = task[0], task[1], float(task[2])
        self.affinity = task[3] if len(task) > 3 else None
        self.crashes = 0
        self.solo = False  # travels in a chunk of its own (after its chunk could not be read)


class _PoolCore:
    """All pool state; the background thread owns the workers, callers only enqueue."""

    def __init__(self, num_workers: int, preload: tuple[str, ...]) -> None:
        self.num_workers = num_workers
        self.preload = preload
        self.lock = threading.Lock()
        self.pending: collections.deque[_Task] = collections.deque()
        self.workers: list[WorkerHandle] = []
        self.reaping: list[Any] = []  # killed worker processes not yet reaped
        self.spawner = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rm-grader-spawn")
        self.starting = 0  # worker starts in progress
        self.start_failures = 0  # starts in a row that ended before the worker was ready
        self.born: list[concurrent.futures.Future] = []  # finished starts, for the pool thread
        self.closed = False  # no new tasks
        self.released = False  # workers stopped, descriptors closed
        self.thread: threading.Thread | None = None
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.wake_r, selectors.EVENT_READ, None)
        self.next_seq = 0
        self.stats: collections.Counter[str] = collections.Counter()
        self.max_seconds = 0.0
        self.task_seconds: dict[str, float] = {}  # per target: running mean of recent task times
        self.ctx: ForkServerContext | None = None

    # -- called from any thread

    def submit(self, tasks: list[tuple[str, tuple, float]]) -> concurrent.futures.Future:
        batch = _Batch(len(tasks))
        if not tasks:
            batch.future.set_result([])
            return batch.future
        with self.lock:
            if self.closed:
                raise PoolClosedError("the grader pool is closed")
            first = self.next_seq
            self.pending.extend([_Task(first + pos, batch, pos, task) for pos, task in enumerate(tasks)])
            self.next_seq = first + len(tasks)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="rm-grader-pool", daemon=True)
                self.thread.start()
        self._wake()
        return batch.future

    def _wake(self) -> None:
        try:
            os.write(self.wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # a full pipe already guarantees a wake-up

    def close(self, timeout: float = 5.0) -> None:
        with self.lock:
            if self.released:
                return
            self.closed = self.released = True
            thread = self.thread
        self._wake()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self.spawner.shutdown(wait=True, cancel_futures=True)
        self._adopt_born()  # workers that finished starting meanwhile are killed
        self._shutdown_workers()
        with self.lock:
            left = list(self.pending)
            self.pending.clear()
        for task in left:
            self._fail_batch(task.batch, PoolClosedError("the grader pool was closed before this task ran"))
        for fd in (self.wake_r, self.wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self.selector.close()

    # -- the background thread

    def _run(self) -> None:
        try:
            while not self.closed:
                self.reaping = [p for p in self.reaping if p.is_alive()]  # is_alive() reaps
                busy = self.reaping or any(w.inflight for w in self.workers)
                events = self.selector.select(WATCH_INTERVAL_S if busy else None)
                for key, _ in events:
                    if key.data is None:
                        self._drain_wake()
                    else:
                        self._read(key.data)
                if self.closed:
                    break
                self._adopt_born()
                self._check_deadlines()
                self._dispatch()
        except BaseException as err:  # never die silently with callers waiting
            logger.exception("grader pool thread failed")
            self._fail_everything(err)

    def _drain_wake(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _request_workers(self) -> None:
        """Start workers up to num_workers, off this thread: a start waits on the fork server,
        which can take seconds on a loaded machine, and deadlines must keep being enforced."""
        while len(self.workers) + self.starting < self.num_workers and not self.closed:
            self.starting += 1
            self.spawner.submit(self._spawn).add_done_callback(self._born)

    def _spawn(self) -> WorkerHandle:
        if self.ctx is None:
            self.ctx = multiprocessing.get_context("forkserver")
            self.ctx.set_forkserver_preload(list(self.preload))
        return start_worker(self.ctx, self.preload)

    def _born(self, future: concurrent.futures.Future) -> None:
        with self.lock:
            self.born.append(future)
        self._wake()

    def _adopt_born(self) -> None:
        """Pool thread: take the workers the spawner started (or its errors)."""
        with self.lock:
            born, self.born = self.born, []
        for future in born:
            self.starting -= 1
            if future.cancelled() or (self.closed and future.exception() is not None):
                continue
            failure = future.exception()
            if isinstance(failure, WorkerStartError):
                self.start_failures += 1
                if self.start_failures < MAX_START_FAILURES:
                    logger.warning(
                        "%s (start %d of %d in a row that failed)",
                        failure,
                        self.start_failures,
                        MAX_START_FAILURES,
                    )
                    continue  # _dispatch asks for another while tasks wait
            # a start that keeps failing, or any other error, fails the pool and its tasks with the cause
            # (see _run): every worker would die the same way, and nothing would run
            worker = future.result()
            self.start_failures = 0
            if self.closed:
                worker.process.kill()
                self.reaping.append(worker.process)
                continue
            self.selector.register(worker.conn.fileno(), selectors.EVENT_READ, worker)
            self.workers.append(worker)

    def _dispatch(self) -> None:
        if self.pending:
            self._request_workers()
        while True:
            with self.lock:
                self._drop_cancelled()
                if not self.pending:
                    return
                size = self._chunk_size()
                worker = self._pick_worker(size)
                if worker is None:
                    return
                chunk = self._take_chunk(size)
            seqs = [t.seq for t in chunk]
            try:
                blob = pickle.dumps([(t.seq, t.target, t.payload) for t in chunk], pickle.HIGHEST_PROTOCOL)
            except Exception:  # find the culprits one by one
                self._set_aside_unpicklable(chunk)
                continue
            worker.inflight.update(zip(seqs, chunk, strict=True))
            try:
                worker.conn.send((seqs, blob))
            except OSError:
                self._worker_died(worker, killed_for=None)

    def _take_chunk(self, size: int) -> list[_Task]:
        """The next `size` tasks (caller holds the lock), extended so as not to split a run of one
        affinity (a GRPO group: one label): the graders' own memos (sympy, math_verify) then see
        the group's repeats in one process. A solo task travels alone."""
        pending = self.pending
        first = pending.popleft()
        chunk = [first]
        if first.solo:
            return chunk
        affinity = first.affinity
        limit = min(MAX_CHUNK, size)
        while pending and len(chunk) < MAX_CHUNK:
            task = pending[0]
            if task.solo or (len(chunk) >= limit and (affinity is None or task.affinity != affinity)):
                break
            chunk.append(pending.popleft())
            affinity = task.affinity
        return chunk

    def _chunk_size(self) -> int:
        share = math.ceil(len(self.pending) / (2 * self.num_workers))
        per_task = self.task_seconds.get(self.pending[0].target)
        if per_task is None:
            return max(1, min(4, share))
        fits = int(CHUNK_SECONDS / max(per_task, 1e-6))
        floor = int(MIN_CHUNK_SECONDS / max(per_task, 1e-6))
        return max(1, min(MAX_CHUNK, fits, max(share, floor)))

    def _pick_worker(self, size: int) -> WorkerHandle | None:
        """An idle worker, else one with less than a chunk left to do (sending its next chunk
        early keeps it from idling between chunks); None while more workers are starting."""
        idle = [w for w in self.workers if not w.inflight]
        if idle:
            return idle[0]
        if self.starting:
            return None
        ready = [w for w in self.workers if len(w.inflight) < max(size, 2)]
        return min(ready, key=lambda w: len(w.inflight)) if ready else None

    def _set_aside_unpicklable(self, chunk: list[_Task]) -> None:
        """Fail the tasks whose input cannot be pickled; send the others again."""
        retry = []
        for task in chunk:
            try:
                pickle.dumps((task.target, task.payload))
                retry.append(task)
            except Exception as err:
                self._finish(task, Outcome(ERROR, f"the task's input cannot be sent to a worker: {err}", 0.0))
        with self.lock:
            self.pending.extendleft(reversed(retry))

    def _drop_cancelled(self) -> None:
        while self.pending and self.pending[0].batch.future.cancelled():
            self.pending.popleft()

    def _read(self, worker: WorkerHandle, drain: bool = False) -> None:
        """Take one message of results (the selector said one is there; it says so again while
        more are waiting), or with `drain` every message already sent."""
        if worker.dead:
            return
        inflight = worker.inflight
        try:
            while not drain or worker.conn.poll():
                for seq, status, value, seconds in worker.conn.recv():
                    task = inflight.pop(seq, None)
                    if task is None:
                        continue
                    if status == UNREADABLE:
                        if not task.solo:  # find out which task of the chunk it was
                            task.solo = True
                            with self.lock:
                                self.pending.appendleft(task)
                            continue
                        status = ERROR
                    self._finish(task, Outcome(status, value, seconds))
                if not drain:
                    return
        except (EOFError, OSError):
            self._worker_died(worker, killed_for=None)

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for worker in list(self.workers):
            if not worker.inflight:
                continue
            running = worker.running()
            if running is None:
                continue
            seq, start = running
            task = worker.inflight.get(seq)
            if task is not None and now - start > task.timeout:
                self._worker_died(worker, killed_for=(task, now - start))

    def _worker_died(self, worker: WorkerHandle, killed_for: tuple[_Task, float] | None) -> None:
        """Kill (if needed) and forget a worker, settle its tasks, and start its replacement."""
        running = worker.running()
        if killed_for is not None:
            self._read(worker, drain=True)  # keep what the rest of its chunk already produced
            if worker.dead:
                return
        worker.dead = True
        if killed_for is not None:
            # Reaped later: tearing down a process that grew a huge sympy heap takes a while,
            # and the task's caller should not wait for it.
            worker.process.kill()
        else:
            worker.process.join(1.0)  # it ended by itself, so this is immediate (the exit code)
        self.reaping.append(worker.process)
        try:
            self.selector.unregister(worker.conn.fileno())
        except (KeyError, ValueError, OSError):
            pass
        worker.conn.close()
        self.workers.remove(worker)
        self.stats["restarts"] += 1
        if killed_for is not None:
            task, elapsed = killed_for
            worker.inflight.pop(task.seq, None)
            self.stats["timeouts"] += 1
            self._finish(
                task, Outcome(TIMEOUT, f"killed after {elapsed:.2f} s (timeout {task.timeout:g} s)", elapsed)
            )
        else:
            self.stats["crashes"] += 1
            exit_code = worker.process.exitcode
            culprit = worker.inflight.get(running[0]) if running else None
            if culprit is not None and running is not None:  # a culprit was found through `running`
                worker.inflight.pop(culprit.seq)
                elapsed = time.monotonic() - running[1]
                self._finish(
                    culprit, Outcome(CRASH, f"the grader process died (exit code {exit_code})", elapsed)
                )
        retry = []
        for task in worker.inflight.values():
            if killed_for is None:
                task.crashes += 1
                if task.crashes >= MAX_CRASH_RETRIES:
                    self._finish(
                        task, Outcome(CRASH, "the grader process died twice while holding this task", 0.0)
                    )
                    continue
            retry.append(task)
        worker.inflight = {}
        with self.lock:
            self.pending.extendleft(reversed(retry))
        self._request_workers()  # a replacement, warm before the next task arrives

    def _finish(self, task: _Task, outcome: Outcome) -> None:
        self.stats["tasks"] += 1
        seconds = outcome.seconds
        if outcome.status == OK:
            mean = self.task_seconds.get(task.target)
            self.task_seconds[task.target] = seconds if mean is None else 0.9 * mean + 0.1 * seconds
        if seconds > self.max_seconds:
            self.max_seconds = seconds
        batch, pos = task.batch, task.pos
        outcomes = batch.outcomes
        if outcomes[pos] is not None:
            return
        outcomes[pos] = outcome
        batch.remaining -= 1
        if batch.remaining == 0 and not batch.future.done():
            try:
                batch.future.set_result(outcomes)
            except concurrent.futures.InvalidStateError:
                pass  # cancelled by its caller meanwhile

    def _fail_batch(self, batch: _Batch, err: BaseException) -> None:
        if not batch.future.done():
            try:
                batch.future.set_exception(err)
            except concurrent.futures.InvalidStateError:
                pass

    def _fail_everything(self, err: BaseException) -> None:
        with self.lock:
            self.closed = True
            tasks = list(self.pending)
            self.pending.clear()
        for worker in self.workers:
            tasks.extend(worker.inflight.values())
        for task in tasks:
            self._fail_batch(task.batch, RuntimeError(f"the grader pool failed: {type(err).__name__}: {err}"))
        self.spawner.shutdown(wait=True, cancel_futures=True)
        self._adopt_born()
        self._shutdown_workers()

    def _shutdown_workers(self) -> None:
        workers, self.workers = self.workers, []
        for process in self.reaping:
            process.join(2.0)
        self.reaping = []
        for worker in workers:
            try:
                if worker.inflight:
                    worker.process.kill()
                else:
                    worker.conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + 2.0
        for worker in workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(1.0)
            for task in worker.inflight.values():
                self._fail_batch(
                    task.batch, PoolClosedError("the grader pool was closed while this task ran")
                )
            try:
                worker.conn.close()
            except OSError:
                pass


class GraderPool:
    """Run module-level functions (named "pkg.mod:func") in killable worker processes.

    `submit([(target, args, timeout[, affinity]), ...])` returns a future of one `Outcome` per
    task, in order (consecutive tasks with the same affinity go to the same worker when they
    can): `ok` with the function's return value, `error` with the traceback text, `timeout`
    when the task ran longer than its timeout (its worker is killed and replaced), or `crash`
    when its worker died. The timeout bounds a task's own run time, not its wait in the queue.
    """

    def __init__(self, num_workers: int | None = None, *, preload: tuple[str, ...] = DEFAULT_PRELOAD) -> None:
        if num_workers is not None and num_workers < 1:
            raise ValueError(f"GraderPool num_workers must be >= 1, got {num_workers}")
        self._core = _PoolCore(num_workers or default_num_workers(), tuple(preload))
        # Also runs at interpreter exit, so workers never outlive their owner.
        self._finalizer = weakref.finalize(self, self._core.close)

    @property
    def num_workers(self) -> int:
        return self._core.num_workers

    def submit(self, tasks: list[tuple[str, tuple, float]]) -> concurrent.futures.Future:
        return self._core.submit(tasks)

    def stats(self) -> dict[str, float]:
        """Counts since creation: tasks, timeouts, crashes, restarts; and the longest task's seconds."""
        out = {k: float(self._core.stats[k]) for k in ("tasks", "timeouts", "crashes", "restarts")}
        out["max_seconds"] = self._core.max_seconds
        return out

    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in list(self._core.workers)]

    def close(self) -> None:
        """Stop the workers (killing busy ones) and fail tasks still waiting."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return self._core.closed

    def __enter__(self) -> GraderPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "CRASH",
    "ERROR",
    "OK",
    "TIMEOUT",
    "GraderPool",
    "Outcome",
    "PoolClosedError",
    "default_num_workers",
]
