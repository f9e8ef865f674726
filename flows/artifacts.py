"""Prefect artifacts of a campaign: per rollout id a metrics table; the curves so far; one progress bar.

The flow's thread only queues them. One background thread makes the API calls, in the order they
were queued, so neither the round trips nor drawing the chart hold up the rollout loop. Curves
and progress describe the whole campaign, so a newer one that is queued before an older one went
out replaces it; every rollout id's metrics table is sent. An artifact that cannot be sent is a
warning in the flow's log and never fails the campaign: the run store holds the same numbers.

    with ArtifactPublisher(campaign_name) as artifacts:    # inside the flow run
        artifacts.load_history(store, first_id)
        artifacts.rollout(rollout_id, metrics)              # after each id
        artifacts.progress(done, total)
    # leaving the block sends what is queued, waiting at most `flush_timeout_s`
"""

from __future__ import annotations

import contextvars
import logging
import re
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from slime_wf.plot import data_uri, line_chart
from slime_wf.redact import redact_url
from slime_wf.store import RunStore

REWARD, LENGTH = "rollout/raw_reward", "rollout/response_len/mean"

# kind ("table" | "markdown" | "progress"), key, description, content
Sender = Callable[[str, str, str, Any], None]


def artifact_key(*parts: Any) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(str(p) for p in parts).lower())).strip("-")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class CurveHistory:
    """Raw reward and mean response length by rollout id, kept in memory: the run store's
    metrics.json files are read once when a campaign (re)starts, then each finished id adds its own."""

    def __init__(self) -> None:
        self.points: dict[int, tuple[float | None, float | None]] = {}

    @classmethod
    def from_store(cls, store: RunStore, upto: int) -> CurveHistory:
        """Ids `0 .. upto-1` as their metrics.json say; an id without one stays a gap."""
        history = cls()
        for rid in range(upto):
            history.add(rid, store.read_json(RunStore.rollout_file(rid, "metrics.json"), default={}))
        return history

    def add(self, rollout_id: int, metrics: dict[str, Any]) -> None:
        self.points[rollout_id] = (_number(metrics.get(REWARD)), _number(metrics.get(LENGTH)))

    def series(self, upto: int) -> tuple[list[float | None], list[float | None]]:
        """Rewards and lengths of ids `0 .. upto`."""
        points = [self.points.get(rid, (None, None)) for rid in range(upto + 1)]
        return [r for r, _ in points], [n for _, n in points]


def metrics_table(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"metric": k, "value": v} for k, v in sorted(metrics.items()) if _number(v) is not None]


def curves_markdown(campaign: str, rewards: list[float | None], lengths: list[float | None]) -> str:
    chart = data_uri(line_chart([rewards, lengths]))
    rows = "\n".join(
        f"| {rid} | {r:.4f} | {n:.1f} |"
        for rid, (r, n) in enumerate(zip(rewards, lengths, strict=True))
        if r is not None and n is not None
    )
    return (
        f"## {campaign}: reward (blue) and response length (orange) by rollout id\n\n"
        f"![curves]({chart})\n\n| rollout | raw reward | response length |\n| --- | --- | --- |\n{rows}\n"
    )


def send_to_prefect(kind: str, key: str, description: str, content: Any) -> None:
    """One artifact through Prefect's API, attached to the flow run of the calling context."""
    from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact

    if kind == "table":
        create_table_artifact(table=content, key=key, description=description)
    elif kind == "markdown":
        create_markdown_artifact(markdown=content, key=key, description=description)
    elif kind == "progress":
        create_progress_artifact(progress=content, key=key, description=description)
    else:
        raise ValueError(f"artifact {key}: unknown kind {kind!r} (table, markdown or progress)")


@dataclass(eq=False)  # jobs are removed from the queue by identity
class _Job:
    kind: str
    key: str
    description: str
    content: Callable[[], Any]  # made in the publisher's thread: only the jobs that go out pay for it
    replaceable: bool


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
        send: Sender = send_to_prefect,
        logger: Any = None,
        flush_timeout_s: float = 60.0,
    ):
        self.campaign = campaign
        self.history = CurveHistory()  # the publisher's thread alone reads and extends it
        self.flush_timeout_s = flush_timeout_s
        self.counts = {"queued": 0, "sent": 0, "replaced": 0, "failed": 0, "unsent": 0}
        self._send = send
        self._logger = logger if logger is not None else _run_logger()
        self._jobs: deque[_Job] = deque()
        self._replaceable: dict[str, _Job] = {}
        self._new_points: list[tuple[int, dict[str, Any]]] = []
        self._history_source: tuple[RunStore, int] | None = None
        self._in_flight: _Job | None = None
        self._cond = threading.Condition()
        self._closing = self._abandoned = False
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(self._work,), daemon=True, name=f"artifacts-{campaign}"
        )
        self._thread.start()

    # ---- the flow's side: queue and return -------------------------------------------------

    def load_history(self, store: RunStore, upto: int) -> None:
        """The curves of ids before `upto` (the first id this run does) come from the run store; they
        are read once, in the publisher's thread, before the first curves go out."""
        with self._cond:
            self._history_source = (store, upto)

    def rollout(self, rollout_id: int, metrics: dict[str, Any]) -> None:
        """Queue rollout `rollout_id`'s metrics table and the curves up to it."""
        name = self.campaign
        rows = metrics_table(metrics)
        self._queue(
            _Job(
                "table",
                artifact_key(name, "rollout", f"{rollout_id:06d}", "metrics"),
                f"campaign {name}, rollout {rollout_id}",
                lambda: rows,
                replaceable=False,
            )
        )
        point = {REWARD: metrics.get(REWARD), LENGTH: metrics.get(LENGTH)}
        with self._cond:
            self._new_points.append((rollout_id, point))
        self._queue(
            _Job(
                "markdown",
                artifact_key(name, "curves"),
                f"curves up to rollout {rollout_id}",
                lambda: curves_markdown(name, *self._series(rollout_id)),
                replaceable=True,
            )
        )

    def progress(self, done: int, total: int) -> None:
        share = 100.0 * min(max(done, 0), total) / max(total, 1)
        self._queue(
            _Job(
                "progress",
                artifact_key(self.campaign, "progress"),
                f"campaign {self.campaign}: {done} of {total} rollout ids",
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

    def _series(self, upto: int) -> tuple[list[float | None], list[float | None]]:
        with self._cond:
            source = self._history_source
        if source is not None:  # a failed read raises here and is tried again with the next curves
            stored = CurveHistory.from_store(*source).points
            self.history.points = {**stored, **self.history.points}  # what this run measured wins
            with self._cond:
                self._history_source = None
        with self._cond:
            points, self._new_points = self._new_points, []
        for rid, metrics in points:
            self.history.add(rid, metrics)
        return self.history.series(upto)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closing:
                    self._cond.wait()
                if self._abandoned or not self._jobs:
                    return
                job = self._in_flight = self._jobs.popleft()
                if self._replaceable.get(job.key) is job:
                    del self._replaceable[job.key]
            try:
                self._send(job.kind, job.key, job.description, job.content())
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
