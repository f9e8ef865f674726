"""Shared test helpers: tiny models and campaigns, process and kill helpers, the Prefect server."""
