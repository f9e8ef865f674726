"""Imported once by the grader pool's fork server: load and warm up every grader.

Workers are forked from the fork server, so what is imported and warmed here (sympy's and
math_verify's parsers build tables on first use) is shared by every worker, and a worker that
replaces a killed one starts hot instead of spending its first task's time budget on imports.
"""

from __future__ import annotations

import math_verify  # noqa: F401 - imported for the workers' benefit

from . import rules

try:
    for _rm_type in rules.GRADERS:
        rules.grade(
            _rm_type, "</think> \\boxed{\\frac{1}{2}}\nAnswer: 2", "2" if _rm_type == "dapo" else "0.5"
        )
except Exception:  # a failed warm-up only costs speed; the real call reports errors
    pass
