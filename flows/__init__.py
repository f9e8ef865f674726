"""Prefect flows: the campaign loop, checkpoint preparation and evaluation (thin wrappers over tasks)."""
