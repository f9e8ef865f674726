"""Prefect flows: the campaign loop, checkpoint preparation and evaluation (thin wrappers over tasks).

Importing them changes no setting: the entry points apply Prefect's settings (`prefect_settings`).
"""
