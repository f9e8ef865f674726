"""How a campaign's flow runs look in the Prefect UI: their names and tags, and what reaches their logs.

- Names: the campaign and its first rollout id, `demo@0`, or `demo@7 (resume)` for a run that goes
  on from a committed id. Prefect asks for the name when the run is created, before the flow body
  runs, so `flow_run_name` reads the run store's manifest; `label_flow_run` corrects it once the
  campaign has started, should the two differ (another run committed meanwhile).
- Tags: `campaign:<name>` (with `slime-wf`), also on runs started from the command line, which
  carry no deployment tags.
- Logs: warnings and errors of the library's loggers (`slime_wf.*`) go to the run's log in the UI,
  and the "Finished in state Completed()" line of every successful task run is left out (a failed
  or crashed task run still logs its final state). Prefect has no setting for that line, so a
  logging filter on `prefect.task_runs` drops it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

from slime_wf.config import CampaignConfig
from slime_wf.store import RunStore

LIBRARY_LOGGER = "slime_wf"


def run_label(campaign: str, first: int) -> str:
    return f"{campaign}@{first}" + (" (resume)" if first > 0 else "")


def campaign_tags(campaign: str) -> list[str]:
    return ["slime-wf", f"campaign:{campaign}"]


def _config_of(parameters: dict[str, Any]) -> CampaignConfig:
    config = parameters["config"]
    return config if isinstance(config, CampaignConfig) else CampaignConfig.model_validate(config)


def next_rollout_id(cfg: CampaignConfig) -> int:
    """The id a train run starts at, as the run store's manifest says now (0 for a new campaign)."""
    manifest = RunStore.for_campaign(cfg).read_manifest() or {}
    last = manifest.get("last_completed_rollout_id")
    return 0 if last is None else int(last) + 1


def train_run_name() -> str:
    """`flow_run_name` of the train flow: `<campaign>@<first id>`; the flow's name alone if the store
    cannot be read (the run then fails with the store's own error, under a plain name)."""
    from prefect.runtime import flow_run

    try:
        cfg = _config_of(flow_run.parameters)
    except Exception:  # a name must not fail the run before its body reports the real error
        return "train"
    try:
        return run_label(cfg.campaign, next_rollout_id(cfg))
    except Exception:
        return cfg.campaign


def campaign_run_name(flow_name: str):
    """`flow_run_name` of the prepare and evaluate flows: `<campaign>: <flow>`."""

    def name() -> str:
        from prefect.runtime import flow_run

        try:
            return f"{_config_of(flow_run.parameters).campaign}: {flow_name}"
        except Exception:
            return flow_name

    return name


def label_flow_run(campaign: str, first: int | None = None) -> None:
    """Tag the current flow run `campaign:<campaign>` and, given `first`, name it `run_label(campaign,
    first)`. A failed update is a warning: the label is a view, never worth failing the campaign."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    run = context.flow_run
    tags = sorted(set(run.tags or []) | set(campaign_tags(campaign)))
    name = run_label(campaign, first) if first is not None else run.name
    if tags == sorted(run.tags or []) and name == run.name:
        return
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(run.id, name=name, tags=tags)
        run.name, run.tags = name, tags
    except Exception as err:
        logging.getLogger(__name__).warning("flow run %s was not labelled: %s", run.id, err)


class _FinishedCompleted(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.levelno <= logging.INFO and record.getMessage().startswith("Finished in state Completed")
        )


def _run_log_handler(level: int) -> logging.Handler:
    from prefect.exceptions import MissingContextError
    from prefect.logging.handlers import APILogHandler

    class RunLogHandler(APILogHandler):
        """Prefect's API log handler for the library's loggers. A record from a thread outside any
        run (an engine's log reader) has no run to go to: it is skipped, as it is not the run's."""

        def handleError(self, record: logging.LogRecord) -> None:
            if isinstance(sys.exc_info()[1], MissingContextError):
                return
            super().handleError(record)

    return RunLogHandler(level=level)


@contextlib.contextmanager
def run_logs(level: int = logging.WARNING) -> Iterator[None]:
    """Within a flow run: the library's records at `level` and above go to the run's log, and the
    task runs' "Finished in state Completed()" lines stay out of it."""
    library = logging.getLogger(LIBRARY_LOGGER)
    task_runs = logging.getLogger("prefect.task_runs")
    handler, quiet = _run_log_handler(level), _FinishedCompleted()
    library.addHandler(handler)
    task_runs.addFilter(quiet)
    try:
        yield
    finally:
        library.removeHandler(handler)
        task_runs.removeFilter(quiet)
