"""A real Prefect server for the tests that need one (deployments, schedules, run history).

    conftest.py imports `prefect_server`: take it as an argument

The fixture yields the API URL. Subprocesses get it through `prefect_env(prefect_server)`; in-process
clients through `prefect.settings.temporary_settings({PREFECT_API_URL: prefect_server})`.
"""

from __future__ import annotations

import os

import pytest

from helpers.prefect_server import local_prefect_server, offline_env


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """`prefect server start` on a free port of 127.0.0.1, with its own PREFECT_HOME; stopped at the end."""
    with local_prefect_server(tmp_path_factory.mktemp("prefect-server")) as api:
        yield api


def prefect_env(api_url: str, home: str | os.PathLike, **extra: str) -> dict[str, str]:
    """The environment of a subprocess that talks to the server at `api_url` (client state under `home`)."""
    env = dict(os.environ)
    env.update(offline_env(home), PREFECT_API_URL=api_url, PREFECT_LOGGING_LEVEL="INFO", **extra)
    return env
