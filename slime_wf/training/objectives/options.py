"""The objective options as the objectives take them: `ObjectiveOptions`, defined once with the
campaign config (`slime_wf.config.objective`), where the train section is built on the same
fields, so names, defaults, meaning and checks cannot drift apart.

The objectives read `args.<flag>` like slime does. Give them an `ObjectiveOptions`, resolved
once (the trainer does): they use it as it is. Give them any other namespace (a campaign's
`cfg.args()`, a test's `Namespace(...)`) and they resolve it on the call: a missing option gets
slime's default, a bad one raises `ObjectiveConfigError` naming the option, the value and what
is allowed.
"""

from __future__ import annotations

import argparse
from typing import Any

from slime_wf.config.objective import (
    ADVANTAGE_ESTIMATORS,
    KL_LOSS_TYPES,
    LOSS_TYPES,
    ObjectiveConfigError,
    ObjectiveOptions,
)


def resolve_objective_args(args: Any = None, **overrides: Any) -> argparse.Namespace:
    """A new namespace: every attribute of `args`, `overrides` on top, and the objective options
    resolved (missing ones at slime's defaults, checked, `eps_clip_high` never null)."""
    if args is None:
        values: dict[str, Any] = {}
    elif isinstance(args, dict):
        values = dict(args)
    else:
        try:
            values = dict(vars(args))
        except TypeError:  # no __dict__: only the options themselves can be read
            values = ObjectiveOptions.from_args(args).model_dump()
    values.update(overrides)
    return argparse.Namespace(**{**values, **ObjectiveOptions.from_args(values).model_dump()})


__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "KL_LOSS_TYPES",
    "LOSS_TYPES",
    "ObjectiveConfigError",
    "ObjectiveOptions",
    "resolve_objective_args",
]
