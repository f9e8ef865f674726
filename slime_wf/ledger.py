"""The run ledger: what makes a campaign's run store trustworthy.

- **The manifest** (`manifest.json`) is the commit point. `train` writes an initial one (nothing
  committed yet) before it writes anything else, so a store that holds rollouts but no manifest
  was not made by a run of this campaign, or lost its manifest: `check_fresh_start` refuses it.
- **The lease** (`lease.json`) makes `train` the campaign's one writer; see `Lease`.
- **The invariant** (`check_campaign_invariant`) checks that nothing was lost or counted twice.

The lease and its races. Taking or renewing the lease is a compare-and-swap on `lease.json`
(`RunStore.write_if`): a local store checks and writes under an `flock`; S3 uses conditional PUTs
(`If-None-Match: *` to create, `If-Match: <ETag>` to renew, take over or release), which AWS S3,
MinIO and moto evaluate atomically. So two `train`s never both hold it. After each write the lease
is read back and its token compared; this only matters on an S3-compatible store that ignores the
conditional headers, where two starters racing within one round trip could both believe they hold
it. Even then the loser's next heartbeat (a conditional PUT on the ETag it wrote) fails, and every
commit renews the lease first, so a writer that lost its lease stops before it commits anything.

Staleness. A holder on this machine (same host, boot and pid namespace) whose process is gone (or
whose pid now belongs to a younger process) is taken over at once: a `train` restarted after
kill -9 goes on without waiting. A holder elsewhere is taken over once its heartbeat is older than
`storage.lease_timeout_s` (the larger of the holder's and the taker's setting), judged by the
taker's clock against the holder's: hosts must agree on the time to well within that timeout.

Size: one module over 400 lines because the manifest, the lease and the invariant are the three
parts of one commit protocol, each checked against the others.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import psutil

from slime_wf.store import RunStore, StoreConflict

logger = logging.getLogger(__name__)

LEASE = "lease.json"


class LeaseHeldError(RuntimeError):
    """Another live `train` holds the campaign's lease."""


class LeaseLostError(RuntimeError):
    """This process held the lease, and another one took it over: it must stop writing."""


class OrphanedRolloutsError(RuntimeError):
    """The run store holds rollouts or checkpoints but no manifest: starting fresh would delete them."""


class InvariantError(AssertionError):
    """The run store breaks the campaign invariant; the message lists each problem."""


# ---- the manifest ------------------------------------------------------------------------------


def check_fresh_start(store: RunStore, campaign: str) -> None:
    """Raise `OrphanedRolloutsError` when the store has rollouts or checkpoints but no manifest."""
    if store.read_manifest() is not None:
        return
    rollouts, checkpoints = store.rollout_ids(), store.checkpoint_ids()
    if not rollouts and not checkpoints:
        return
    found = []
    if rollouts:
        found.append(f"rollouts {_span(rollouts)}")
    if checkpoints:
        found.append(f"checkpoints {_span(checkpoints)}")
    raise OrphanedRolloutsError(
        f"run store {store.uri} holds {' and '.join(found)} but no {RunStore.MANIFEST}, so none of it is committed "
        f"and starting campaign {campaign!r} fresh would delete it. Choose: delete the folder {store.uri} to start "
        f"this campaign over, or keep it and pick another campaign name (e.g. --set campaign={campaign}-2)"
    )


def initial_manifest(campaign: str, config_hash: str, num_rollout: int) -> dict[str, Any]:
    """The manifest of a campaign that has committed nothing yet."""
    now = time.time()
    return {
        "campaign": campaign,
        "config_hash": config_hash,
        "num_rollout": num_rollout,
        "last_completed_rollout_id": None,
        "last_checkpoint": None,
        "weights": None,
        "created_at": now,
        "updated_at": now,
    }


def _span(ids: list[int]) -> str:
    return str(ids) if len(ids) <= 6 else f"[{ids[0]}..{ids[-1]}] ({len(ids)} ids)"


# ---- the lease -----------------------------------------------------------------------------------


def _read_first_line(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.readline().strip() or None
    except OSError:
        return None


def machine_identity() -> dict[str, str | None]:
    """What makes a pid meaningful: the host, its boot, and the pid namespace (containers share a
    host name with `--network host` but not their pids)."""
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = None
    return {
        "host": socket.gethostname(),
        "boot_id": _read_first_line("/proc/sys/kernel/random/boot_id"),
        "pid_namespace": pid_ns,
    }


def process_state(pid: int) -> tuple[bool, float | None]:
    """(alive, start time) of a process on this machine; a zombie is gone, and a process this user
    may not inspect is alive with an unknown start time."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False, None
        return True, proc.create_time()
    except psutil.NoSuchProcess:
        return False, None
    except psutil.AccessDenied:
        return True, None


def _when(ts: float | None) -> str:
    if ts is None:
        return "an unknown time"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class Lease:
    """The campaign's writer lease in `<campaign>/lease.json`, renewed by a heartbeat thread.

        with Lease(store, timeout_s=120):   # LeaseHeldError when another live train holds it
            ...                             # lease.confirm() before each commit

    The record: host, pid (and the process's start time, against pid reuse), a random token,
    started_at, heartbeat_at, timeout_s, released_at. Releasing keeps the record with released_at
    set (the last holder stays visible), and a released lease is free.
    """

    def __init__(
        self,
        store: RunStore,
        *,
        timeout_s: float,
        heartbeat_s: float | None = None,
        campaign: str | None = None,
    ):
        if timeout_s <= 0:
            raise ValueError(f"lease timeout_s must be > 0, got {timeout_s}")
        self.store = store
        self.campaign = campaign or store.uri.rsplit("/", 1)[-1]
        self.timeout_s = float(timeout_s)
        self.heartbeat_s = float(heartbeat_s) if heartbeat_s is not None else self.timeout_s / 4
        self.token = secrets.token_hex(16)
        self.record: dict[str, Any] | None = None
        self.lost: str | None = None
        self._version: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self.record is not None and self.lost is None

    # ---- taking it ---------------------------------------------------------------------------

    def acquire(self) -> Lease:
        """Take the lease, or raise `LeaseHeldError` naming the live holder; a stale one is taken over."""
        if self.record is not None:
            raise RuntimeError("this Lease object was already acquired; make a new one")
        for _attempt in range(5):
            current = self.store.read_versioned(LEASE)
            holder, version = (None, None) if current is None else (_parse(current[0]), current[1])
            reason = self.takeover_reason(holder)
            if reason is None:
                assert holder is not None  # takeover_reason gives "no lease" for a missing holder
                raise LeaseHeldError(self._held_message(holder))
            if holder is not None and holder.get("released_at") is None:
                logger.warning(
                    "campaign %s: taking over the lease of host %s pid %s: %s",
                    self.campaign,
                    holder.get("host"),
                    holder.get("pid"),
                    reason,
                )
            now = time.time()
            record = {
                **machine_identity(),
                "pid": os.getpid(),
                "pid_started_at": process_state(os.getpid())[1],
                "token": self.token,
                "started_at": now,
                "heartbeat_at": now,
                "timeout_s": self.timeout_s,
                "released_at": None,
            }
            try:
                self.store.write_if(LEASE, _encode(record), version=version)
            except StoreConflict:
                continue  # another starter changed it in between: look again
            back = self.store.read_versioned(LEASE)
            if back is None or (_parse(back[0]) or {}).get("token") != self.token:
                continue
            self.record, self._version = record, back[1]
            self._thread = threading.Thread(
                target=self._heartbeat_loop, name=f"lease-{self.campaign}", daemon=True
            )
            self._thread.start()
            return self
        raise LeaseHeldError(
            f"campaign {self.campaign}: {self.store.url(LEASE)} kept changing while this train tried to take it "
            "(other trains of the same campaign are starting); start only one"
        )

    def takeover_reason(self, holder: dict[str, Any] | None, now: float | None = None) -> str | None:
        """Why `holder`'s lease may be taken over, or None while it is live."""
        if holder is None:
            return "no lease"
        if holder.get("released_at") is not None:
            return "released"
        if not isinstance(holder.get("pid"), int) or not isinstance(holder.get("heartbeat_at"), (int, float)):
            return "the lease record is unreadable"
        here = machine_identity()
        if all(holder.get(k) == here[k] for k in here):
            alive, started = process_state(holder["pid"])
            recorded = holder.get("pid_started_at")
            if not alive:
                return f"its process {holder['pid']} on this host is gone"
            if started is not None and recorded is not None and abs(started - recorded) > 1.0:
                return f"pid {holder['pid']} on this host now belongs to another process"
            return None  # alive here: never judged by the clock
        timeout = max(self.timeout_s, float(holder.get("timeout_s") or 0))
        age = (time.time() if now is None else now) - holder["heartbeat_at"]
        if age > timeout:
            return f"its last heartbeat was {age:.0f} s ago (timeout {timeout:.0f} s)"
        return None

    def _held_message(self, holder: dict[str, Any]) -> str:
        age = time.time() - holder["heartbeat_at"]
        same_host = holder.get("host") == socket.gethostname()
        timeout = max(self.timeout_s, float(holder.get("timeout_s") or 0))
        return (
            f"campaign {self.campaign} is being trained by another process: host {holder.get('host')}, pid "
            f"{holder.get('pid')}, since {_when(holder.get('started_at'))} (last heartbeat {age:.0f} s ago; lease "
            f"{self.store.url(LEASE)}). One train writes a campaign at a time. Wait for that run to finish or stop "
            f"it (kill {holder.get('pid')}{'' if same_host else ' on ' + str(holder.get('host'))}); a holder that "
            f"died is taken over at once on its own host, and elsewhere {timeout:.0f} s after its last heartbeat "
            "(storage.lease_timeout_s). For a separate experiment, pick another campaign name."
        )

    # ---- keeping it ----------------------------------------------------------------------------

    def check(self) -> None:
        """Raise `LeaseLostError` if the heartbeat found the lease taken over (no I/O)."""
        if self.record is None:
            raise RuntimeError(
                f"campaign {self.campaign}: the writer lease was never taken (call start() first)"
            )
        if self.lost is not None:
            raise LeaseLostError(self.lost)

    def confirm(self) -> None:
        """Renew the lease now and prove it is still ours; call right before a commit."""
        self.check()
        self._beat()

    def _beat(self) -> None:
        with self._lock:
            if self.lost is not None:
                raise LeaseLostError(self.lost)
            held = self.record
            assert held is not None  # beats start after acquire, and confirm() checks first
            record = {**held, "heartbeat_at": time.time()}
            try:
                self._version = self.store.write_if(LEASE, _encode(record), version=self._version)
            except StoreConflict:
                now = self.store.read_versioned(LEASE)
                other = _parse(now[0]) if now else None
                by = (
                    "deleted"
                    if other is None
                    else (
                        f"taken by host {other.get('host')} pid {other.get('pid')} at {_when(other.get('started_at'))}"
                    )
                )
                self.lost = (
                    f"campaign {self.campaign}: this train (host {held['host']}, pid {held['pid']}) lost "
                    f"its writer lease {self.store.url(LEASE)}: {by}. It stops without committing; the other run "
                    "continues the campaign"
                )
                logger.error(self.lost)
                raise LeaseLostError(self.lost) from None
            self.record = record

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._beat()
            except LeaseLostError:
                return
            except Exception as err:  # a store hiccup: the next beat retries, well within the timeout
                logger.warning(
                    "campaign %s: lease heartbeat failed (%s: %s); retrying in %.0f s",
                    self.campaign,
                    type(err).__name__,
                    err,
                    self.heartbeat_s,
                )

    # ---- giving it back ---------------------------------------------------------------------------

    def release(self) -> None:
        """Stop the heartbeat and mark the lease released (safe to call twice; never raises)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            if self.record is None or self.lost is not None or self.record.get("released_at") is not None:
                return
            record = {**self.record, "released_at": time.time()}
            try:
                self._version = self.store.write_if(LEASE, _encode(record), version=self._version)
                self.record = record
            except Exception as err:
                logger.warning(
                    "campaign %s: could not release the lease %s (%s: %s); the next train takes it over (at once on "
                    "this host, elsewhere after storage.lease_timeout_s)",
                    self.campaign,
                    self.store.url(LEASE),
                    type(err).__name__,
                    err,
                )

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def read_lease(store: RunStore) -> dict[str, Any] | None:
    """The lease record, None when there is none."""
    current = store.read_versioned(LEASE)
    return None if current is None else _parse(current[0])


def _encode(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, indent=1) + "\n").encode()


def _parse(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


# ---- the invariant --------------------------------------------------------------------------------


def _preview(groups: Any, limit: int = 20) -> str:
    groups = sorted(groups)
    more = f" and {len(groups) - limit} more" if len(groups) > limit else ""
    return f"{groups[:limit]}{more}"


def check_campaign_invariant(store: RunStore) -> dict[str, Any]:
    """Nothing lost, nothing counted twice, across the committed rollout ids:

    - the groups drawn (`drawn_new` over the ledgers) are exactly 0..N-1, N being the data source's
      group counter after the last committed id: none missing, none extra, none twice;
    - every group drawn is trained once, dropped once with a reason, or waiting in the buffer;
    - each id's trained groups are exactly the groups in its samples.jsonl;
    - rollouts or checkpoints without a manifest are an error.

    Returns counts; raises `InvariantError` naming each problem.
    """
    manifest = store.read_manifest()
    empty = {"committed": -1, "groups": 0, "trained": 0, "dropped": 0, "buffer": 0}
    if manifest is None:
        try:
            check_fresh_start(store, store.uri.rsplit("/", 1)[-1])
        except OrphanedRolloutsError as err:
            raise InvariantError(f"campaign invariant broken: {err}") from None
        return empty
    if manifest.get("last_completed_rollout_id") is None:
        return empty
    last = int(manifest["last_completed_rollout_id"])
    problems: list[str] = []
    drawn: list[int] = []
    fates: dict[int, list[str]] = {}
    for rid in range(last + 1):
        missing = [
            n for n in ("ledger.json", "samples.jsonl") if not store.exists(RunStore.rollout_file(rid, n))
        ]
        if missing:
            problems.append(f"rollout {rid} is committed but its {' and '.join(missing)} is missing")
            continue
        ledger = store.read_json(RunStore.rollout_file(rid, "ledger.json"))
        samples = store.read_jsonl(RunStore.rollout_file(rid, "samples.jsonl"))
        drawn += ledger["drawn_new"]
        for g in ledger["trained"]:
            fates.setdefault(g, []).append(f"trained@{rid}")
        for reason, groups in ledger["dropped"].items():
            for g in groups:
                fates.setdefault(g, []).append(f"dropped:{reason}@{rid}")
        in_samples = {row["group_index"] for row in samples}
        trained = set(ledger["trained"])
        if trained - in_samples:
            problems.append(
                f"rollout {rid}: groups trained per ledger.json but absent from samples.jsonl: "
                f"{_preview(trained - in_samples)}"
            )
        if in_samples - trained:
            problems.append(
                f"rollout {rid}: groups in samples.jsonl that ledger.json does not list as trained: "
                f"{_preview(in_samples - trained)}"
            )
    state = store.read_json(RunStore.rollout_file(last, "data_source.json"), default=None)
    if state is None:
        raise InvariantError(
            f"campaign invariant broken in {store.uri}: rollout {last} is committed but its "
            "data_source.json (the group counter and the buffer) is missing"
        )
    for group in state["buffer"]:
        fates.setdefault(group[0]["group_index"], []).append("buffer")

    counter = int(state["sample_group_index"])
    twice = [g for g, n in Counter(drawn).items() if n > 1]
    if twice:
        problems.append(f"groups drawn twice: {_preview(twice)}")
    never_drawn = set(range(counter)) - set(drawn)
    if never_drawn:
        problems.append(
            f"groups the data source handed out (its counter is {counter} after rollout {last}) that "
            f"no ledger drew: {_preview(never_drawn)}"
        )
    beyond = {g for g in drawn if not 0 <= g < counter}
    if beyond:
        problems.append(
            f"groups drawn per the ledgers that the data source never handed out (its counter is "
            f"{counter} after rollout {last}): {_preview(beyond)}"
        )
    for g in sorted(set(drawn)):
        if len(fates.get(g, [])) != 1:
            problems.append(f"group {g}: {fates.get(g, ['lost: neither trained, dropped nor buffered'])}")
    extra = set(fates) - set(drawn)
    if extra:
        problems.append(f"groups with a fate but never drawn: {_preview(extra)}")
    if problems:
        shown = "; ".join(problems[:20]) + (f"; and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise InvariantError(f"campaign invariant broken in {store.uri}: {shown}")
    return {
        "committed": last,
        "groups": len(drawn),
        "trained": sum(f[0].startswith("trained") for f in fates.values()),
        "dropped": sum(f[0].startswith("dropped") for f in fates.values()),
        "buffer": len(state["buffer"]),
    }
