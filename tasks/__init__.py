"""Prefect tasks: one per step of a rollout id, each a thin wrapper over slime_wf.

Importing this package applies Prefect's offline, quiet settings (unless already set): no
analytics, no telemetry, Prefect's home inside the working folder.
"""

import os


def configure_prefect_environment() -> None:
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


configure_prefect_environment()
