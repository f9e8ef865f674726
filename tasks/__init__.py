"""Prefect tasks: one per step of a rollout id, each a thin wrapper over slime_wf."""
