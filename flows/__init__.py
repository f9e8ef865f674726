"""Prefect flows: the campaign loop, checkpoint preparation and evaluation (thin wrappers over tasks).

Importing `tasks` first applies Prefect's offline settings before Prefect itself is imported.
"""

import tasks  # noqa: F401
