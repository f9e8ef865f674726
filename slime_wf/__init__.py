"""slime-wf: RL post-training for language models (slime-style), orchestrated by Prefect.

The library never imports Prefect: `flows/` and `tasks/` wrap it.
"""

__version__ = "0.1.0"
