"""Prefect's offline, quiet settings, applied by the entry points before Prefect is imported.

Prefect reads its settings once, when it is imported, so the process that runs a flow must set
them first: the `slime-wf` command does (before it imports the flows or the deployments), and so
does `deployments.serve.serve`. Nothing sets them at import time; a process that imports the flows
itself (a test, a notebook, a Prefect worker started with `prefect worker start`) uses its own
environment, and can call `configure_prefect_environment()` first to get these defaults.

Each setting is a default: a value already in the environment wins.
"""

from __future__ import annotations

import os


def configure_prefect_environment() -> None:
    """No analytics, no telemetry, Prefect's home inside the working folder: each setting the
    environment does not set already."""
    defaults = {
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_HOME": os.path.abspath(".prefect"),
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
        # a temporary server on a busy machine can take longer than Prefect's default to come up
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
