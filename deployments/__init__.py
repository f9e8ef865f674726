"""Prefect deployments of the campaign flows: `serve.py` serves them from one process; `prefect.yaml`
describes the same deployments for `prefect deploy` and a process work pool."""
