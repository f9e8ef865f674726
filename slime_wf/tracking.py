"""The campaign's curves in TensorBoard and wandb (slime's `use_tensorboard` and `use_wandb`).

Every metric of a rollout id (`slime_wf.metrics`) goes to each tracker at step = rollout id, once:

- An id is written when it is committed (its checkpoint saved and the manifest naming it), so a tracker holds
  exactly the store's timeline. With `checkpoint.save_interval` 1 that is every id as it finishes; with a larger
  interval the ids since the last commit arrive together at the next commit. An uncommitted id, which a resume
  redoes, never reaches a tracker, so a redone id cannot appear twice.
- A tracker's own files say how far it got: when the campaign (re)starts, each tracker reads back the last step
  it holds (TensorBoard's event files, wandb's run files) and receives the committed ids after it. A kill between
  a tracker's write and anything else therefore neither loses an id nor writes one twice. A kill in the middle
  of TensorBoard's write of an id leaves some of its scalars on disk: on resume the others are written
  (`TensorBoardTracker.complete`), still none twice.

A tracker has a `name`, `last_step()`, `complete(id, metrics_of)` (finish the write of the last step read
back, if it was cut short), `write(id, metrics)` and `close()`. A tracker that fails to write logs a warning and is tried again with the same ids at the next commit: curves
are worth less than the campaign.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any, Literal, cast

from slime_wf.metrics import numeric
from slime_wf.redact import redact_urls_in
from slime_wf.store import RunStore

logger = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
"""The folder of the event files inside the campaign's run store folder."""


class TensorBoardTracker:
    """Scalars in TensorBoard event files under `log_dir`; with `upload`, a local mirror whose event files are
    copied to that store folder after each write (an s3:// run store)."""

    name = "tensorboard"

    def __init__(self, log_dir: str, upload: RunStore | None = None):
        self.log_dir = log_dir
        self.upload = upload
        os.makedirs(log_dir, exist_ok=True)
        if upload is not None:
            self._download_missing()
        self._sizes: dict[str, int] = {}
        self._writer: Any = None
        # (the last step in the event files, its tags): a kill in the middle of an id's write leaves some
        # of its tags on disk and not the others; `complete` writes the rest on resume
        self._last: tuple[int, set[str]] | None = None

    def _event_files(self) -> list[str]:
        return sorted(n for n in os.listdir(self.log_dir) if n.startswith("events.out.tfevents."))

    def _download_missing(self) -> None:
        """A resume on another host: the mirror gets the store's event files first, so the read-back and
        `tensorboard --logdir` on the mirror see the whole run."""
        assert self.upload is not None
        have = set(self._event_files())
        for name in self.upload.listdir():
            if name.startswith("events.out.tfevents.") and name not in have:
                with open(os.path.join(self.log_dir, name), "wb") as f:
                    f.write(self.upload.read_bytes(name))

    def last_step(self) -> int | None:
        """The largest step any scalar has in the event files (TensorBoard's own reader)."""
        from tensorboard.backend.event_processing.event_accumulator import (  # type: ignore[import-untyped]
            SCALARS,
            EventAccumulator,
        )

        if not self._event_files():
            return None
        acc = EventAccumulator(self.log_dir, size_guidance={SCALARS: 0})
        acc.Reload()
        at = [(e.step, tag) for tag in acc.Tags()[SCALARS] for e in acc.Scalars(tag)]
        if not at:
            return None
        last = max(step for step, _ in at)
        self._last = (last, {tag for step, tag in at if step == last})
        return last

    def complete(self, rollout_id: int, metrics_of: Callable[[int], dict[str, float] | None]) -> None:
        """When `rollout_id` is the last step read back, write the tags of its metrics (`metrics_of`, read
        only then) that the event files lack."""
        if self._last is None or self._last[0] != rollout_id:
            return
        held = self._last[1]
        self._last = None
        missing = {tag: value for tag, value in (metrics_of(rollout_id) or {}).items() if tag not in held}
        if missing:
            logger.info(
                "tensorboard: rollout id %d was cut short; writing its %d other scalars",
                rollout_id,
                len(missing),
            )
            self.write(rollout_id, missing)

    def write(self, rollout_id: int, metrics: dict[str, float]) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir, flush_secs=3600)
        for tag, value in metrics.items():
            self._writer.add_scalar(tag, value, global_step=rollout_id)
        self._writer.flush()
        if self.upload is not None:
            self._upload_changed()

    def _upload_changed(self) -> None:
        assert self.upload is not None
        for name in self._event_files():
            size = os.path.getsize(os.path.join(self.log_dir, name))
            if self._sizes.get(name) != size:
                with open(os.path.join(self.log_dir, name), "rb") as f:
                    self.upload.write_bytes(name, f.read())
                self._sizes[name] = size

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# ---- wandb ------------------------------------------------------------------------------------

_WANDB_HEADER = 7  # ":W&B", magic 0xBEE1, version
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: str) -> Iterator[bytes]:
    """The records of a `.wandb` run file (wandb's transaction log: LevelDB's log framing in 32 KiB blocks,
    each chunk checked by CRC-32). Stops at a torn or corrupt tail, as a kill mid-write leaves one."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb run file (no :W&B header)")
    pos, pending = _WANDB_HEADER, b""
    while pos + 7 <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < 7:  # the writer pads a block's tail that cannot hold a chunk header
            pos += left_in_block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        if len(chunk) < length or zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF != crc:
            return
        pos += 7 + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""
        else:
            return


def wandb_history(path: str) -> list[dict[str, Any]]:
    """The history rows (what `run.log` wrote, `_step` included) of a `.wandb` file, decoded with wandb's own
    protobuf schema."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for raw in wandb_records(path):
        record = pb.Record()  # type: ignore[attr-defined]  # generated per protobuf version
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows


def wandb_run_files(wandb_dir: str, run_id: str) -> list[str]:
    """The `.wandb` files of run `run_id` under `wandb_dir`, oldest first: one per (re)start of the campaign."""
    found = glob.glob(os.path.join(wandb_dir, "wandb", f"*run-*-{run_id}", f"run-{run_id}.wandb"))

    def started(path: str) -> str:
        stamp = re.search(r"\d{8}_\d{6}", os.path.basename(os.path.dirname(path)))
        return stamp.group(0) if stamp else ""

    return sorted(found, key=started)


class WandbTracker:
    """One wandb run per campaign (its id derived from the run store and the campaign's creation time), resumed
    by every restart; in offline mode each restart adds a folder `offline-run-*-<id>` under `<dir>/wandb`, and
    `wandb sync --id <id> <those folders>` uploads them in order as one run.

    wandb's service writes a run file out only when the run ends: a process killed with -9 leaves a file without
    the steps it logged (as seen with wandb 0.31). The read-back finds them missing, and the next start logs those
    ids again from the run store, so the run's files together hold each id once."""

    name = "wandb"

    def __init__(self, args: Any, run_id: str, wandb_dir: str, config: dict[str, Any]):
        import wandb

        self.run_id = run_id
        self.dir = wandb_dir
        self.mode = args.wandb_mode or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        os.makedirs(wandb_dir, exist_ok=True)
        self._last_local = self._read_last_step()
        self._wait_for_a_new_run_folder()
        try:
            self.run = self._init(wandb, args, config)
        except Exception as err:
            raise RuntimeError(
                f"tracking.use_wandb: wandb.init of run {run_id} ({self.mode}, files under {wandb_dir}) failed: "
                f"{type(err).__name__}: {err}. Set tracking.wandb_mode=offline to log without a server, or "
                "tracking.use_wandb=false"
            ) from err

    def _wait_for_a_new_run_folder(self) -> None:
        """wandb names a start's folder by the second it starts (`offline-run-YYYYMMDD_HHMMSS-<id>`, local time),
        so a restart within the second of the last start would reuse that folder and overwrite its run file,
        and the ids it holds with it. Wait (under a second) until the name is new."""
        while True:
            stamp = time.strftime("%Y%m%d_%H%M%S", time.localtime())
            if not glob.glob(os.path.join(self.dir, "wandb", f"*run-{stamp}-{self.run_id}")):
                return
            time.sleep(0.05)

    def _init(self, wandb: Any, args: Any, config: dict[str, Any]) -> Any:
        return wandb.init(
            project=args.wandb_project or "slime-wf",
            entity=args.wandb_team,
            group=args.wandb_group,
            name=args.wandb_run_name or args.campaign,
            id=self.run_id,
            resume="allow",
            mode=cast(Literal["online", "offline", "disabled"], self.mode),
            dir=self.dir,
            config=config,
            reinit="create_new",
            settings=wandb.Settings(console="off", x_disable_stats=True, save_code=False, silent=True),
        )

    def _read_last_step(self) -> int | None:
        steps = [
            int(row["_step"])
            for path in wandb_run_files(self.dir, self.run_id)
            for row in wandb_history(path)
            if "_step" in row
        ]
        return max(steps) if steps else None

    def last_step(self) -> int | None:
        # online, the server knows the run's steps even when this host has none of its files
        server = int(self.run.step) - 1 if self.mode == "online" and self.run.step else None
        known = [s for s in (self._last_local, server) if s is not None]
        return max(known) if known else None

    def complete(self, rollout_id: int, metrics_of: Callable[[int], dict[str, float] | None]) -> None:
        """Nothing to complete: wandb logs an id's metrics as one history row."""

    def write(self, rollout_id: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=rollout_id)

    def close(self) -> None:
        import wandb

        self.run.finish()
        # finish() returns before wandb's service has written the run file out; its teardown waits for that,
        # so that the next start of the campaign reads back every step this one logged
        wandb.teardown()


# ---- the campaign's trackers ------------------------------------------------------------------


def tensorboard_dir(args: Any, store: RunStore, scratch: str) -> tuple[str, RunStore | None]:
    """Where the event files go, and the store folder they are uploaded to (None: written in place)."""
    if args.tb_project_name:
        if "://" in args.tb_project_name:
            raise ValueError(
                f"tracking.tb_project_name={args.tb_project_name!r}: give a local folder; for an s3:// run store "
                "leave it null and the event files are uploaded to <store>/<campaign>/tensorboard"
            )
        return os.path.join(args.tb_project_name, args.tb_experiment_name or args.campaign), None
    if store.is_local:
        return store.local_path(TENSORBOARD_DIR), None
    return os.path.join(scratch, TENSORBOARD_DIR), store.child(TENSORBOARD_DIR)


def wandb_dir(args: Any, store: RunStore, scratch: str) -> str:
    if args.wandb_dir:
        return str(args.wandb_dir)
    return store.local_path() if store.is_local else scratch


def wandb_run_id(campaign: str, store: RunStore, created_at: Any) -> str:
    """Stable for the life of the campaign's run store; a store started over gets a new run."""
    digest = hashlib.sha256(f"{store.uri}|{created_at}".encode()).hexdigest()[:8]
    return f"{campaign}-{digest}"


class Tracking:
    """The trackers a campaign writes to; each committed id reaches each tracker once, in order."""

    def __init__(self, trackers: list[Any]):
        self.trackers = trackers
        self._next: dict[str, int] = {}
        for tracker in trackers:
            last = tracker.last_step()
            self._next[tracker.name] = 0 if last is None else last + 1
            if last is not None:
                logger.info("%s holds rollout ids up to %d; it continues after them", tracker.name, last)

    @classmethod
    def open(cls, cfg: Any, args: Any, store: RunStore, scratch: str, manifest: dict[str, Any]) -> Tracking:
        trackers: list[Any] = []
        if args.use_tensorboard:
            log_dir, upload = tensorboard_dir(args, store, scratch)
            trackers.append(TensorBoardTracker(log_dir, upload))
            logger.info("TensorBoard: tensorboard --logdir %s", log_dir)
        if args.use_wandb:
            config = redact_urls_in(cfg.model_dump(mode="json"))
            run_id = wandb_run_id(cfg.campaign, store, manifest.get("created_at"))
            trackers.append(WandbTracker(args, run_id, wandb_dir(args, store, scratch), config))
        return cls(trackers)

    def next_id(self, name: str) -> int:
        """The first rollout id tracker `name` has not received."""
        return self._next[name]

    def log_committed(
        self, last_committed: int | None, metrics_of: Callable[[int], dict[str, Any] | None]
    ) -> None:
        """Give each tracker the committed ids it lacks, up to `last_committed`. `metrics_of(id)` is the id's
        metrics.json (None when it has none: that id stays a gap)."""
        if last_committed is None:
            return
        cache: dict[int, dict[str, Any] | None] = {}

        def numeric_metrics(rid: int) -> dict[str, float] | None:
            if rid not in cache:
                cache[rid] = metrics_of(rid)
            metrics = cache[rid]
            return numeric(metrics) if metrics else None

        for tracker in self.trackers:
            first = self._next[tracker.name]
            try:
                if first > 0:  # the id before: its write may have been cut short by a kill
                    tracker.complete(first - 1, numeric_metrics)
                for rid in range(first, last_committed + 1):
                    metrics = numeric_metrics(rid)
                    if metrics:
                        tracker.write(rid, metrics)
                    self._next[tracker.name] = rid + 1
            except Exception as err:  # a tracker's fault must not stop the campaign
                logger.warning(
                    "%s: writing rollout ids %d..%d failed (%s: %s); retried at the next commit",
                    tracker.name,
                    self._next[tracker.name],
                    last_committed,
                    type(err).__name__,
                    err,
                )

    def close(self) -> None:
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as err:
                logger.warning("%s: closing failed: %s: %s", tracker.name, type(err).__name__, err)
        self.trackers = []
