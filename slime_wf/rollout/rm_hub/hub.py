"""RewardHub: every reward call of a rollout, bounded in time, deduplicated, and counted.

A hub owns the grader worker pool, the grading cache, the remote reward client and the
counters; the rollout loop creates one, passes it to `async_rm` / `batched_async_rm` as
`hub=`, calls `reset_cache()` at the start of each rollout and `metrics()` at its end.

What a sample's reward comes from, first match wins:
1. the sample's own `custom_rm_path`, called for that sample alone;
2. `args.custom_rm_path`: called per sample, or once per group with `group_rm`;
3. `sample.metadata["rm_type"]`, else `args.rm_type`: a rule-based grader (in the worker pool,
   cached) or `remote_rm`.

No call can hang a rollout: each one is bounded by `args.rm_timeout` (see custom.py for the
one kind of function that can still stall the event loop, and how that is reported). A call
that runs out of time, or whose worker process dies, gives the sample `args.rm_failure_reward`
(as `{reward_key: value}` when `reward_key` is set), is counted and logged, and leaves the
reason in `sample.metadata["rm_failure"]`. A call that raises does the same with
`rm_on_error: failure_reward`; by default it raises `RewardError`, which names the sample and
the function (this holds for custom functions, rule-based graders and remote_rm alike).

A reward that is NaN or infinite (the number, or a dict reward's `reward_key` entry) also gets
`rm_failure_reward` and is counted (`rm/non_finite`): one NaN would make its whole
group's advantages NaN.

Size: one module over 400 lines because `RewardHub` is one object whose dispatch, timeout, cache
and counters share state per rollout; the graders live in their own modules and the worker processes
in `pool.py`.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import functools
import logging
import math
import numbers
import sys
import threading
from typing import Any

from slime_wf.redact import redact_url

from . import custom, rules
from .cache import GradingCache, Pending
from .pool import CRASH, ERROR, OK, TIMEOUT, GraderPool, Outcome, default_num_workers
from .remote import RemoteRewardClient, RemoteRewardError, RemoteRewardTimeout

logger = logging.getLogger(__name__)

GRADE_TARGET = "slime_wf.rollout.rm_hub.rules:grade"
# Keys per pool submission while a batch is still being prepared.
SUBMIT_SLICE = 256
# An async custom function that returns this much later than its timeout was blocking the loop.
STALL_GRACE_S = 0.5
COUNTERS = (
    "samples",
    "gradings",
    "cache_hits",
    "timeouts",
    "errors",
    "worker_crashes",
    "failure_rewards",
    "custom_calls",
    "remote_calls",
    "remote_retries",
    "loop_stalls",
    "non_finite",
)


class RewardError(RuntimeError):
    """A reward could not be computed; the message names the sample(s) and the reward function."""


def _name(samples: list[Any]) -> str:
    indices = [getattr(s, "index", None) for s in samples]
    return f"sample index={indices[0]}" if len(indices) == 1 else f"samples index={indices}"


def _non_finite(value: Any, reward_key: str | None) -> bool:
    """Whether a reward (or, with reward_key, its entry) is a NaN or an infinity."""
    if reward_key and isinstance(value, dict):
        value = value.get(reward_key)
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, int) or not isinstance(
        value, numbers.Real
    ):  # ints are finite (and may not fit a float)
        return False
    return not math.isfinite(value)


class RewardHub:
    def __init__(self, num_workers: int | None = None, *, cache: bool = True) -> None:
        self._num_workers = num_workers
        self._use_cache = cache
        self._pool: GraderPool | None = None
        self._remote = RemoteRewardClient()
        self._lock = threading.Lock()
        self._cache = GradingCache()
        self._functions: dict[str, Any] = {}
        self._counts: collections.Counter = collections.Counter()
        self._max_seconds = 0.0
        self._closed = False

    # ---- lifecycle and metrics --------------------------------------------------------------

    def pool(self, args: Any = None) -> GraderPool:
        """The worker pool, started on first use with rm_workers (or one worker per core)."""
        with self._lock:
            if self._closed:
                raise RewardError("this RewardHub is closed")
            if self._pool is None:
                n = self._num_workers or getattr(args, "rm_workers", None) or default_num_workers()
                self._pool = GraderPool(n)
            return self._pool

    @property
    def closed(self) -> bool:
        return self._closed

    def reset_cache(self) -> None:
        """Forget cached gradings (call at the start of each rollout)."""
        self._cache.clear()

    def metrics(self, reset: bool = False) -> dict[str, float]:
        """Counters under `rm/...`, and the longest single call in seconds."""
        with self._lock:
            out = {f"rm/{name}": float(self._counts[name]) for name in COUNTERS}
            out["rm/max_seconds"] = self._max_seconds
            if reset:
                self._counts.clear()
                self._max_seconds = 0.0
        return out

    def close(self) -> None:
        """Stop the worker pool (workers exit; busy ones are killed)."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    async def aclose(self) -> None:
        """close(), and close the remote reward connections of the running loop."""
        await self._remote.aclose()
        self.close()

    def __enter__(self) -> RewardHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> RewardHub:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def _record_locked(self, outcome: Outcome) -> None:
        """Count one finished call by how it ended (caller holds the lock)."""
        self._max_seconds = max(self._max_seconds, outcome.seconds)
        if outcome.status == TIMEOUT:
            self._counts["timeouts"] += 1
        elif outcome.status == CRASH:
            self._counts["worker_crashes"] += 1
        elif outcome.status == ERROR:
            self._counts["errors"] += 1

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self._record_locked(outcome)

    # ---- entry points ---------------------------------------------------------------------

    async def async_rm(self, args: Any, sample: Any, **kwargs: Any) -> Any:
        """The reward of one sample."""
        if sample.custom_rm_path:
            return (await self._custom(args, sample.custom_rm_path, sample, [sample], kwargs))[0]
        if getattr(args, "custom_rm_path", None):
            if getattr(args, "group_rm", False):
                raise RewardError(
                    f"{_name([sample])}: group_rm is on, so {args.custom_rm_path!r} takes a whole group; "
                    "reward groups with batched_async_rm(args, group)"
                )
            return (await self._custom(args, args.custom_rm_path, sample, [sample], kwargs))[0]
        return (await self._builtin(args, [sample]))[0]

    async def batched_async_rm(self, args: Any, samples: list[Any], **kwargs: Any) -> list[Any]:
        """The rewards of many samples, in order. With group_rm, one custom call per group."""
        samples = list(samples)
        rewards: list[Any] = [None] * len(samples)
        path = getattr(args, "custom_rm_path", None)
        group_mode = bool(path) and getattr(args, "group_rm", False)
        builtin: list[int] = []
        groups: dict[Any, list[int]] = {}
        jobs = []
        for pos, sample in enumerate(samples):
            if sample.custom_rm_path:
                jobs.append(
                    self._into(
                        rewards, [pos], self._custom(args, sample.custom_rm_path, sample, [sample], kwargs)
                    )
                )
            elif group_mode:
                groups.setdefault(sample.group_index, []).append(pos)
            elif path:
                jobs.append(self._into(rewards, [pos], self._custom(args, path, sample, [sample], kwargs)))
            else:
                builtin.append(pos)
        for positions in groups.values():
            assert path is not None  # groups fill only in group mode, which needs a custom_rm_path
            group = [samples[p] for p in positions]
            jobs.append(self._into(rewards, positions, self._custom(args, path, group, group, kwargs)))
        if builtin:
            jobs.append(self._into(rewards, builtin, self._builtin(args, [samples[p] for p in builtin])))
        tasks = [asyncio.ensure_future(job) for job in jobs]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        return rewards

    @staticmethod
    async def _into(rewards: list[Any], positions: list[int], job: Any) -> None:
        for pos, value in zip(positions, await job, strict=True):
            rewards[pos] = value

    # ---- outcomes -> rewards --------------------------------------------------------------

    def _settle(
        self, args: Any, samples: list[Any], outcome: Outcome, what: str, values: list[Any] | None
    ) -> list:
        """Rewards for `samples` from one outcome (values: the per-sample rewards when ok)."""
        self._count("samples", len(samples))
        if outcome.status == OK:
            assert values is not None  # an ok outcome comes with its values
            rewards = [copy.copy(v) if isinstance(v, dict) else v for v in values]
            reward_key = getattr(args, "reward_key", None)
            for i, value in enumerate(rewards):
                if _non_finite(value, reward_key):
                    rewards[i] = self._non_finite_reward(args, samples[i], value, what)
            return rewards
        cause = outcome.value if isinstance(outcome.value, BaseException) else None
        if cause is not None:
            summary, details = f"{type(cause).__name__}: {cause}", ""
        else:  # a traceback as text (from a worker), or a plain description
            details = str(outcome.value).strip()
            summary = details.splitlines()[-1] if details else outcome.status
            details = "" if details == summary else details
        verb = "timed out" if outcome.status == TIMEOUT else "failed"
        message = f"{what} {verb} for {_name(samples)}: {summary}"
        if outcome.status == ERROR and getattr(args, "rm_on_error", "raise") != "failure_reward":
            raise RewardError(message + (f"\n{details}" if details else "")) from cause
        failure = getattr(args, "rm_failure_reward", 0.0)
        reward_key = getattr(args, "reward_key", None)
        logger.warning("%s; giving rm_failure_reward=%s", message, failure)
        self._count("failure_rewards", len(samples))
        out = []
        for sample in samples:
            if isinstance(getattr(sample, "metadata", None), dict):
                sample.metadata["rm_failure"] = f"{outcome.status}: {summary[:300]}"
            out.append({reward_key: failure} if reward_key else failure)
        return out

    def _non_finite_reward(self, args: Any, sample: Any, value: Any, what: str) -> Any:
        failure = getattr(args, "rm_failure_reward", 0.0)
        reward_key = getattr(args, "reward_key", None)
        shown = f"{reward_key}={value.get(reward_key)!r}" if isinstance(value, dict) else repr(value)
        logger.warning(
            "%s returned a non-finite reward (%s) for %s; giving rm_failure_reward=%s",
            what,
            shown,
            _name([sample]),
            failure,
        )
        self._count("non_finite")
        self._count("failure_rewards")
        if isinstance(getattr(sample, "metadata", None), dict):
            sample.metadata["rm_failure"] = f"non_finite: {what} returned {shown}"
        return {reward_key: failure} if reward_key else failure

    # ---- custom functions ---------------------------------------------------------------------

    def _load(self, path: str) -> Any:
        fn = self._functions.get(path)
        if fn is None:
            fn = self._functions[path] = custom.load(path)
        return fn

    async def _custom(self, args: Any, path: str, subject: Any, samples: list[Any], kwargs: dict) -> list:
        fn = self._load(path)
        group = isinstance(subject, list)
        timeout = float(getattr(args, "rm_timeout", 30.0))
        where = f"custom reward function {path!r}"
        self._count("custom_calls")
        if custom.is_async(fn):
            outcome = await self._run_on_loop(fn, args, subject, kwargs, timeout, where, samples)
        else:
            pool = self.pool(args)
            task = (custom.WORKER_TARGET, (path, args, subject, kwargs, list(sys.path)), timeout)
            outcome = (await asyncio.wrap_future(pool.submit([task])))[0]
            if outcome.status == OK:
                value, returned = outcome.value
                custom.copy_back(subject, returned)
                outcome = Outcome(OK, value, outcome.seconds)
        self._record(outcome)
        values = None
        if outcome.status == OK:
            try:
                if group:
                    custom.check_group_rewards(outcome.value, len(samples))
                    values = list(outcome.value)
                else:
                    custom.check_reward(outcome.value)
                    values = [outcome.value]
            except TypeError as err:
                self._count("errors")
                outcome = Outcome(ERROR, err, outcome.seconds)
        return self._settle(args, samples, outcome, where, values)

    async def _run_on_loop(self, fn, args, subject, kwargs, timeout, where, samples) -> Outcome:
        loop = asyncio.get_running_loop()
        start = loop.time()
        limit = asyncio.timeout(timeout)
        try:
            async with limit:
                value = await fn(args, subject, **kwargs)
            outcome = Outcome(OK, value, 0.0)
        except TimeoutError as err:
            if limit.expired():
                outcome = Outcome(TIMEOUT, f"no result after {timeout:g} s (rm_timeout)", 0.0)
            else:
                outcome = Outcome(ERROR, err, 0.0)
        except Exception as err:
            outcome = Outcome(ERROR, err, 0.0)
        elapsed = loop.time() - start
        if elapsed > timeout + STALL_GRACE_S and outcome.status != TIMEOUT:
            self._count("loop_stalls")
            logger.error(
                "%s took %.1f s for %s (rm_timeout %g s) without yielding to the event loop, which stalled "
                "the rollout meanwhile; make it non-blocking, or a plain def (then it runs in the killable "
                "grader workers)",
                where,
                elapsed,
                _name(samples),
                timeout,
            )
        return Outcome(outcome.status, outcome.value, elapsed)

    # ---- rule-based graders and remote_rm -----------------------------------------------------

    @staticmethod
    def _rm_type(args: Any, sample: Any) -> str:
        metadata = sample.metadata if isinstance(sample.metadata, dict) else {}
        rm_type = (metadata.get("rm_type") or getattr(args, "rm_type", None) or "").strip()
        if not rm_type:
            raise RewardError(
                f"{_name([sample])}: no reward model; set reward.rm_type (or the sample's metadata['rm_type']) "
                "or reward.custom_rm_path"
            )
        return rm_type

    async def _builtin(self, args: Any, samples: list[Any]) -> list[Any]:
        rewards: list[Any] = [None] * len(samples)
        timeout = float(getattr(args, "rm_timeout", 30.0))
        # Most batches have one rm_type for all samples: resolved once, unless a sample overrides it.
        default_type = getattr(args, "rm_type", None) or ""
        default_type = default_type.strip() if isinstance(default_type, str) else ""
        share = self._use_cache
        reduce, label_key = rules.reduce, rules.label_key
        by_key: dict[Any, list[int]] = {}
        tasks: dict[Any, tuple] = {}  # key -> its pool task
        remote: list[int] = []
        ready: dict[Any, Outcome] = {}
        owned: list[tuple[list[Any], Any]] = []  # (keys, batch future) this call submitted
        joined: dict[Any, Pending] = {}  # gradings other calls submitted
        fresh: list[Any] = []
        for pos, sample in enumerate(samples):
            metadata = sample.metadata
            if default_type and not (isinstance(metadata, dict) and metadata.get("rm_type")):
                rm_type = default_type
            else:
                rm_type = self._rm_type(args, sample)
            if rm_type == "remote_rm":
                remote.append(pos)
                continue
            try:
                inner, part, text = reduce(rm_type, sample.response)
            except rules.UnknownRewardTypeError as err:
                raise RewardError(f"{_name([sample])}: {err}") from None
            label = sample.label
            lkey = label_key(label)
            key = (inner, lkey, part) if share and lkey is not None else object()
            positions = by_key.get(key)
            if positions is not None:
                positions.append(pos)
                continue
            by_key[key] = [pos]
            # the last entry: gradings for one label (one GRPO group, mostly) share a worker
            tasks[key] = (
                GRADE_TARGET,
                (inner, text, label),
                timeout,
                None if lkey is None else (inner, lkey),
            )
            fresh.append(key)
            if len(fresh) >= SUBMIT_SLICE:  # let the workers start while the rest is prepared
                self._submit(args, fresh, tasks, ready, owned, joined)
                fresh = []
        if fresh:
            self._submit(args, fresh, tasks, ready, owned, joined)
        graded = sum(len(keys) for keys, _ in owned)
        self._count("cache_hits", len(samples) - len(remote) - graded)
        jobs = [self._remote_one(args, samples[pos], pos, rewards) for pos in remote]
        await asyncio.gather(*jobs, self._collect(owned, joined, ready))
        settled = 0
        reward_key = getattr(args, "reward_key", None)
        for key, positions in by_key.items():
            outcome = ready[key]
            # the common case, kept lean: thousands of samples per call
            if outcome.status == OK and not _non_finite(outcome.value, reward_key):
                value = outcome.value
                if type(value) is dict:
                    for pos in positions:
                        rewards[pos] = dict(value)
                else:
                    for pos in positions:
                        rewards[pos] = value
                settled += len(positions)
                continue
            group = [samples[p] for p in positions]
            what = f"rm_type {self._rm_type(args, group[0])!r}"
            values = self._settle(args, group, outcome, what, [outcome.value] * len(group))
            for pos, value in zip(positions, values, strict=True):
                rewards[pos] = value
        self._count("samples", settled)
        return rewards

    def _submit(self, args, keys, tasks, ready, owned, joined) -> None:
        """Take what the cache knows, join gradings already running, send the rest to the pool."""
        new = keys
        if self._use_cache:
            done, joins, new = self._cache.lookup(keys)
            ready.update(done)
            joined.update(joins)
        if new:
            future = self.pool(args).submit([tasks[key] for key in new])
            if self._use_cache:
                self._cache.start(new, future)
            owned.append((new, future))
            future.add_done_callback(functools.partial(self._graded, new))

    @staticmethod
    async def _collect(
        owned: list[tuple[list[Any], Any]], joined: dict[Any, Pending], ready: dict[Any, Outcome]
    ) -> None:
        batches = {id(f): f for _, f in owned}
        batches.update((id(p.future), p.future) for p in joined.values())
        # Shielded: a caller that gives up must not cancel gradings other callers wait on.
        done = {fid: await asyncio.shield(asyncio.wrap_future(f)) for fid, f in batches.items()}
        for keys, future in owned:
            ready.update(zip(keys, done[id(future)], strict=True))
        for key, pending in joined.items():
            ready[key] = done[id(pending.future)][pending.index]

    def _graded(self, keys: list[Any], future: Any) -> None:
        """Pool thread: record a finished batch of gradings in the cache and the counters."""
        outcomes = None if future.cancelled() or future.exception() else future.result()
        if self._use_cache:
            self._cache.finish(keys, outcomes)
        if not outcomes:
            return
        longest = max(outcome.seconds for outcome in outcomes)
        with self._lock:
            self._counts["gradings"] += len(outcomes)
            self._max_seconds = max(self._max_seconds, longest)
            for outcome in outcomes:
                if outcome.status != OK:
                    self._record_locked(outcome)

    async def _remote_one(self, args: Any, sample: Any, pos: int, rewards: list[Any]) -> None:
        url = getattr(args, "rm_url", None)
        timeout = float(getattr(args, "rm_timeout", 30.0))
        payload = {"prompt": sample.prompt, "response": sample.response, "label": sample.label}
        self._count("remote_calls")
        start = asyncio.get_running_loop().time()
        try:
            value, attempts = await self._remote.score(
                url, payload, timeout, token_env=getattr(args, "rm_api_key_env", None)
            )
            self._count("remote_retries", attempts - 1)
            status = OK
        except RemoteRewardTimeout as err:
            status, value = TIMEOUT, str(err)
        except RemoteRewardError as err:
            status, value = ERROR, str(err)
        outcome = Outcome(status, value, asyncio.get_running_loop().time() - start)
        self._record(outcome)
        rewards[pos] = self._settle(
            args, [sample], outcome, f"remote_rm {redact_url(str(url))}", [outcome.value]
        )[0]

    async def remote_rm(self, args: Any, sample: Any) -> Any:
        """slime's remote_rm: the reward server's answer for one sample."""
        rewards = [None]
        await self._remote_one(args, sample, 0, rewards)
        return rewards[0]
