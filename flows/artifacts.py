"""Prefect artifacts of a campaign, as the UI shows them on the flow run's Artifacts tab.

Per campaign (each key made once per flow run, then updated in place as ids finish):
- `<campaign>-progress`: the share of `num_rollout` done.
- `<campaign>-summary`: a table, a row per rollout id, the key metrics as columns.
- `<campaign>-curves`: the chart (`slime_wf.plot`: a panel per quantity) over every id so far.

Per rollout id:
- `<campaign>-rollout-<id>-metrics`: that id's metrics with what each means; counters that are zero
  are left out.
- `<campaign>-rollout-<id>-samples`: a few prompts of the trained batch with their responses,
  rewards and statuses, truncated and escaped for markdown.

Numbers are rounded for display only; the run store's metrics.json keeps them whole.

The flow's thread only queues artifacts. One background thread makes the API calls, in the order
they were queued, so neither the round trips nor drawing the chart hold up the rollout loop. A
newer snapshot of a campaign-wide artifact (progress, summary, curves) that is queued before an
older one went out replaces it; every rollout id's artifacts are sent. Drawing the chart takes
CPU that the campaign's own processes want on a small machine, so the curves are drawn again only
after `CURVES_CPU_SHARE` of the time since the last drawing was spent drawing it (with short
steps: every few ids; at the end, always); the other artifacts go out at once. An artifact that cannot be
sent is a warning in the flow's log and never fails the campaign: the run store holds the same.

    with ArtifactPublisher(campaign_name) as artifacts:    # inside the flow run
        artifacts.load_history(store, first_id)
        artifacts.rollout(rollout_id, metrics)              # after each id
        artifacts.progress(done, total)
    # leaving the block sends what is queued, waiting at most `flush_timeout_s`
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flows.sample_view import samples_markdown
from slime_wf.metrics import describe, numeric, tidy
from slime_wf.plot import campaign_panels, chart_png, data_uri
from slime_wf.redact import redact_url
from slime_wf.store import RunStore

REWARD, LENGTH = "rollout/raw_reward", "rollout/response_len/mean"

# kind ("table" | "markdown" | "progress"), key, description, content
Sender = Callable[[str, str, str, Any], None]


def artifact_key(*parts: Any) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(str(p) for p in parts).lower())).strip("-")


def shown(value: Any, digits: int = 4) -> Any:
    """A number as the tables show it: `digits` significant digits, integers as integers, NaN and
    infinities as text (JSON has no such numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if not math.isfinite(value):
        return str(value)
    if float(value).is_integer() and abs(value) < 1e15:
        return int(value)
    return float(f"{value:.{digits}g}")


class MetricsHistory:
    """Every id's numeric metrics, kept in memory: the run store's metrics.json files are read once when
    a campaign (re)starts, then each finished id adds its own."""

    def __init__(self) -> None:
        self.points: dict[int, dict[str, float]] = {}

    @classmethod
    def from_store(cls, store: RunStore, upto: int) -> MetricsHistory:
        """Ids `0 .. upto-1` as their metrics.json say; an id without one is a gap."""
        history = cls()
        for rid in range(upto):
            metrics = store.read_json(RunStore.rollout_file(rid, "metrics.json"), default=None)
            if metrics:
                history.add(rid, metrics)
        return history

    def add(self, rollout_id: int, metrics: dict[str, Any]) -> None:
        self.points[rollout_id] = numeric(metrics)

    def upto(self, last: int) -> dict[int, dict[str, float]]:
        return {rid: m for rid, m in sorted(self.points.items()) if rid <= last}


def summary_table(history: dict[int, dict[str, float]]) -> list[dict[str, Any]]:
    """A row per rollout id: reward, each evaluation set's reward, response length, loss, entropy, a KL
    (to the reference with use_kl_loss, else engine vs trainer), grad norm, the share of groups dropped,
    and the id's seconds. A missing value is an empty cell."""
    sets = sorted(
        {k.split("/")[1] for m in history.values() for k in m if re.fullmatch(r"eval/[^/]+/reward", k)}
    )
    kl = "train/kl_loss" if any("train/kl_loss" in m for m in history.values()) else "train/rollout_kl"
    rows = []
    for rid, m in sorted(history.items()):
        row: dict[str, Any] = {"rollout": rid, "reward": shown(m.get(REWARD))}
        for s in sets:
            row[f"eval {s}"] = shown(m.get(f"eval/{s}/reward"))
        row["response len"] = shown(m.get(LENGTH), 3)
        row["loss"] = shown(m.get("train/loss"))
        row["entropy"] = shown(m.get("train/entropy"))
        row[kl.removeprefix("train/")] = shown(m.get(kl))
        row["grad norm"] = shown(m.get("train/grad_norm"))
        drop = m.get("filter/drop_fraction")
        row["dropped"] = None if drop is None else f"{drop:.0%}"
        seconds = [v for k, v in m.items() if k.startswith("time/")]
        row["seconds"] = round(sum(seconds), 1) if seconds else None
        rows.append({k: ("" if v is None else v) for k, v in row.items()})
    return rows


def metrics_table(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One id's metrics: name, value (rounded) and meaning, zero counters left out, by name."""
    rows = []
    for name, value in sorted(tidy(numeric(metrics)).items()):
        entry = describe(name)
        rows.append({"metric": name, "value": shown(value), "meaning": entry.meaning if entry else ""})
    return rows


def curves_markdown(campaign: str, history: dict[int, dict[str, float]]) -> str:
    ids = sorted(history)
    span = f"rollout ids {ids[0]} to {ids[-1]}" if ids else "no rollout id finished yet"
    chart = data_uri(chart_png(campaign_panels(history)))
    return (
        f"## {campaign}: curves by rollout id\n\n{span}; the numbers are in the `{artifact_key(campaign, 'summary')}` "
        f"table and each id's metrics table.\n\n![{campaign} curves]({chart})\n"
    )


def _table_data(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows)


class PrefectArtifacts:
    """The default sender: each key is created once, attached to the calling flow run, and updated in
    place after that (so the run's Artifacts tab shows one card per key, not one per update)."""

    def __init__(self) -> None:
        self.ids: dict[str, Any] = {}

    def __call__(self, kind: str, key: str, description: str, content: Any) -> None:
        from prefect.artifacts import (
            create_markdown_artifact,
            create_progress_artifact,
            create_table_artifact,
        )

        known = self.ids.get(key)
        if known is not None:
            from prefect.client.orchestration import get_client
            from prefect.client.schemas.actions import ArtifactUpdate

            data = _table_data(content) if kind == "table" else content
            update = ArtifactUpdate(data=data, description=description)
            with get_client(sync_client=True) as client:
                # In place, as Prefect's `update_artifact` does, without the `prefect.artifact.updated`
                # event it also emits: that event carries the whole new data and the server keeps every
                # one (7 days by default), so the summary, a row per id updated every id, would grow the
                # event store with the square of the campaign's length (600 ids: 36 MB of such events).
                client.request(
                    "PATCH",
                    "/artifacts/{id}",
                    json=update.model_dump(mode="json", exclude_unset=True),
                    path_params={"id": known},
                )
            return
        if kind == "table":
            self.ids[key] = create_table_artifact(table=content, key=key, description=description)
        elif kind == "markdown":
            self.ids[key] = create_markdown_artifact(markdown=content, key=key, description=description)
        elif kind == "progress":
            self.ids[key] = create_progress_artifact(progress=content, key=key, description=description)
        else:
            raise ValueError(f"artifact {key}: unknown kind {kind!r} (table, markdown or progress)")


@dataclass(eq=False)  # jobs are removed from the queue by identity
class _Job:
    kind: str
    key: str
    description: str
    content: Callable[[], Any]  # made in the publisher's thread: only the jobs that go out pay for it
    replaceable: bool
    throttled: bool = False  # made at most CURVES_CPU_SHARE of the time (the chart), and at the end


# The share of the publisher thread's time that drawing the curves may take: after a drawing that took
# t seconds, the next waits until t / CURVES_CPU_SHARE seconds from the last one's start.
CURVES_CPU_SHARE = 0.05


class ArtifactPublisher:
    """Sends a campaign's artifacts from one background thread; see the module's docstring.

    Create it inside the flow run: its thread runs in a copy of the creating context, so Prefect's
    run context (flow run id, API client, settings) holds there too. `counts` tells what happened:
    queued, sent, replaced (a newer snapshot went instead), failed, unsent (still queued when the
    flush gave up).
    """

    def __init__(
        self,
        campaign: str,
        *,
        send: Sender | None = None,
        logger: Any = None,
        flush_timeout_s: float = 60.0,
    ):
        self.campaign = campaign
        self.history = MetricsHistory()  # the publisher's thread alone reads and extends it
        self.flush_timeout_s = flush_timeout_s
        self.counts = {"queued": 0, "sent": 0, "replaced": 0, "failed": 0, "unsent": 0}
        self._send = send if send is not None else PrefectArtifacts()
        self._logger = logger if logger is not None else _run_logger()
        self._jobs: deque[_Job] = deque()
        self._replaceable: dict[str, _Job] = {}
        self._new_points: list[tuple[int, dict[str, Any]]] = []
        self._history_source: tuple[RunStore, int] | None = None
        self._store: RunStore | None = None
        self._in_flight: _Job | None = None
        self._cond = threading.Condition()
        self._closing = self._abandoned = False
        self._due: dict[str, float] = {}  # a throttled key's next drawing may start then (time.monotonic)
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(self._work,), daemon=True, name=f"artifacts-{campaign}"
        )
        self._thread.start()

    # ---- the flow's side: queue and return -------------------------------------------------

    def load_history(self, store: RunStore, upto: int) -> None:
        """The curves and summary of ids before `upto` (the first id this run does) come from the run
        store; they are read once, in the publisher's thread, before the first curves go out. The sample
        viewers read each id's samples from the same store."""
        with self._cond:
            self._history_source = (store, upto)
            self._store = store

    def rollout(self, rollout_id: int, metrics: dict[str, Any]) -> None:
        """Queue rollout `rollout_id`'s metrics table and sample viewer, and the summary and curves up to it."""
        name = self.campaign
        rows = metrics_table(metrics)
        self._queue(
            _Job(
                "table",
                artifact_key(name, "rollout", f"{rollout_id:06d}", "metrics"),
                f"{name}, rollout {rollout_id}: metrics",
                lambda: rows,
                replaceable=False,
            )
        )
        with self._cond:
            store = self._store
            self._new_points.append((rollout_id, dict(metrics)))
        if store is not None:
            self._queue(
                _Job(
                    "markdown",
                    artifact_key(name, "rollout", f"{rollout_id:06d}", "samples"),
                    f"{name}, rollout {rollout_id}: samples of the trained batch",
                    lambda: samples_markdown(
                        name, rollout_id, store.read_jsonl(RunStore.rollout_file(rollout_id, "samples.jsonl"))
                    ),
                    replaceable=False,
                )
            )
        self._queue(
            _Job(
                "table",
                artifact_key(name, "summary"),
                f"{name}: key metrics by rollout id, up to {rollout_id}",
                lambda: summary_table(self._series(rollout_id)),
                replaceable=True,
            )
        )
        self._queue(
            _Job(
                "markdown",
                artifact_key(name, "curves"),
                f"{name}: curves up to rollout {rollout_id}",
                lambda: curves_markdown(name, self._series(rollout_id)),
                replaceable=True,
                throttled=True,
            )
        )

    def progress(self, done: int, total: int) -> None:
        share = 100.0 * min(max(done, 0), total) / max(total, 1)
        self._queue(
            _Job(
                "progress",
                artifact_key(self.campaign, "progress"),
                f"{self.campaign}: {done} of {total} rollout ids done",
                lambda: share,
                replaceable=True,
            )
        )

    def close(self, timeout_s: float | None = None) -> dict[str, int]:
        """Send what is queued, waiting at most `timeout_s` (default `flush_timeout_s`); returns `counts`.
        What is still queued then is dropped with a warning."""
        timeout_s = self.flush_timeout_s if timeout_s is None else timeout_s
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout_s)
        with self._cond:
            gave_up = self._thread.is_alive() and not self._abandoned
            if gave_up:
                self._abandoned = True
                self.counts["unsent"] = len(self._jobs) + (self._in_flight is not None)
                self._jobs.clear()
                self._replaceable.clear()
            counts = dict(self.counts)
        if gave_up:
            self._logger.warning(
                "%d artifact(s) of campaign %s not sent within %.1f s (the Prefect API is slow or down); "
                "the run store has the same numbers",
                counts["unsent"],
                self.campaign,
                timeout_s,
            )
        return counts

    def __enter__(self) -> ArtifactPublisher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _queue(self, job: _Job) -> None:
        with self._cond:
            if self._closing:
                raise RuntimeError(f"the artifact publisher of campaign {self.campaign} is closed")
            if job.replaceable:
                older = self._replaceable.pop(job.key, None)
                if older is not None:
                    self._jobs.remove(older)
                    self.counts["replaced"] += 1
                self._replaceable[job.key] = job
            self._jobs.append(job)
            self.counts["queued"] += 1
            self._cond.notify()

    # ---- the publisher's thread ------------------------------------------------------------

    def _series(self, upto: int) -> dict[int, dict[str, float]]:
        with self._cond:
            source = self._history_source
        if source is not None:  # a failed read raises here and is tried again with the next snapshot
            stored = MetricsHistory.from_store(*source).points
            self.history.points = {**stored, **self.history.points}  # what this run measured wins
            with self._cond:
                self._history_source = None
        with self._cond:
            points, self._new_points = self._new_points, []
        for rid, metrics in points:
            self.history.add(rid, metrics)
        return self.history.upto(upto)

    def _next_job(self) -> tuple[_Job | None, float | None]:
        """The first queued job that may go now, else None and the seconds until one may (None: no job).
        Called with the lock held."""
        now, wait = time.monotonic(), None
        for job in self._jobs:
            due = self._due.get(job.key, 0.0) if job.throttled and not self._closing else 0.0
            if due <= now:
                return job, None
            wait = due - now if wait is None else min(wait, due - now)
        return None, wait

    def _work(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._abandoned:
                        return
                    job, wait = self._next_job()
                    if job is not None or (self._closing and not self._jobs):
                        break
                    self._cond.wait(None if wait is None else min(wait, 60.0))
                if job is None:
                    return
                self._jobs.remove(job)
                self._in_flight = job
                if self._replaceable.get(job.key) is job:
                    del self._replaceable[job.key]
            started = time.monotonic()
            try:
                content = job.content()
                if job.throttled:
                    self._due[job.key] = started + (time.monotonic() - started) / CURVES_CPU_SHARE
                self._send(job.kind, job.key, job.description, content)
                outcome = "sent"
            except (
                Exception
            ) as err:  # an artifact is a view of the run store: never worth failing the campaign
                outcome = "failed"
                # an API error may quote the Prefect API's URL, credentials and all
                self._logger.warning(
                    "artifact %s was not sent: %s: %s", job.key, type(err).__name__, redact_url(str(err))
                )
            with self._cond:
                self._in_flight = None
                if not self._abandoned:
                    self.counts[outcome] += 1


def _run_logger() -> Any:
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)
