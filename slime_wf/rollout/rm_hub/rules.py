"""Rule-based reward types: what each grader reads, and the grading itself.

`grade(rm_type, response, label)` is the reference dispatch (what a worker process runs).
`reduce(rm_type, response)` finds what a grader's verdict depends on: the last boxed answer
for math and deepscaler, the last `Answer:` line of the final 300 characters for dapo. That is
the cache key (GRPO groups repeat answers inside different reasoning), and the shortest text
with the same reward is what travels to the worker (a long response costs no IPC). The
reductions use only linear-time scans of bounded cost, because they run in the rollout's own
process, outside the workers' timeout guard.

`boxed_<type>` grades only the content of the response's last `\\boxed{}`. slime hands that
bare content to the inner grader, where the graders that look for a marker (math and
deepscaler look for `\\boxed`, deepscaler also for `</think>`, dapo for `Answer:`) cannot find
it and score every response as wrong; here the content is put back into the form the inner
grader reads. f1 gets the bare content, as in slime. No box at all grades the empty string.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from typing import Any

from slime_wf.config import rm_type_problem

from .deepscaler import get_deepscaler_rule_based_reward
from .f1 import f1_score
from .math_dapo_utils import compute_score as compute_score_dapo
from .math_utils import grade_answer_verl

DAPO_TAIL_CHARS = 300
# math_dapo_utils grades the last match of this in the tail (Minerva's answer line)
_DAPO_ANSWER = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")
_BRACES = re.compile(r"[{}]")


class UnknownRewardTypeError(ValueError):
    """An rm_type that names no rule-based grader."""


# ---- graders --------------------------------------------------------------------------------


def _label_for_math_verify(label: Any) -> str:
    text = str(label)
    has_delimiters = any(d in text for d in ("$", "\\boxed", "\\(", "\\["))
    return text if has_delimiters else f"${text}$"


def math_verify_reward(response: str, label: Any) -> int:
    """1 if math_verify finds the response's answer equivalent to the label, else 0.

    A bare label ("x^2+1", "\\sqrt{2}") is read as inline math. math_verify's own per-step time
    limits use SIGALRM, which only the main thread may set, so other threads go without them.
    """
    from math_verify import parse, verify

    limit = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(_label_for_math_verify(label), parsing_timeout=limit) or parse(
        str(label), parsing_timeout=limit
    )
    pred = parse(response or "", parsing_timeout=limit)
    if not gold or not pred:
        return 0
    return 1 if verify(gold, pred, timeout_seconds=limit) else 0


# One grader per rule-based type that the config accepts (slime_wf.config.RULE_RM_TYPES).
GRADERS: dict[str, Callable[[str, Any], Any]] = {
    "deepscaler": get_deepscaler_rule_based_reward,
    "math": lambda response, label: 1 if grade_answer_verl(response, label) else 0,
    "dapo": compute_score_dapo,
    "f1": lambda response, label: f1_score(response, label)[0],
    "math_verify": math_verify_reward,
}


def split_rm_type(rm_type: str) -> tuple[str, bool]:
    """(inner type, boxed?) for `math`, `boxed_math`...; unknown types raise."""
    boxed = rm_type.startswith("boxed_")
    inner = rm_type[len("boxed_") :] if boxed else rm_type
    if inner not in GRADERS:
        raise UnknownRewardTypeError(
            rm_type_problem(rm_type) or f"rm_type {rm_type!r} is graded by the reward server, not by a rule"
        )
    return inner, boxed


def grade(rm_type: str, response: str, label: Any) -> Any:
    """The reward of `response` under `rm_type` (boxed_ types included), computed in-process."""
    inner, boxed = split_rm_type(rm_type)
    if boxed:
        response = boxed_rewrite(inner, response)
    return GRADERS[inner](response, label)


# ---- what each grader reads ------------------------------------------------------------------


def last_boxed_content(text: str) -> str | None:
    """Same result as math_utils.extract_answer, scanning braces with a regex instead of per char."""
    if "\\boxed" not in text:
        return None
    start = text.rfind("\\boxed")
    if not text.startswith("\\boxed{", start):
        return None
    depth = 0
    for match in _BRACES.finditer(text, start):
        if match.group() == "{":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return text[start + len("\\boxed{") : match.start()]
    return None


def boxed_rewrite(inner: str, response: str) -> str:
    content = last_boxed_content(response or "")
    if not content:
        return ""
    if inner == "f1":
        return content
    if inner == "dapo":
        return f"Answer: {content}"
    if inner == "deepscaler":
        return "</think>\\boxed{" + content + "}"
    return "\\boxed{" + content + "}"


def _deepscaler_solution(response: str) -> str | None:
    if not response:
        return None
    if "</think>" in response:
        return response[response.rfind("</think>") + len("</think>") :]
    if "###Response" in response:
        return response.split("###Response", 2)[1]
    return None


def reduce(rm_type: str, response: str) -> tuple[str, Any, str]:
    """(inner rm_type, key, text): grade(inner, text, label) == grade(rm_type, response, label),
    and two responses with equal keys get equal rewards for the same label."""
    inner, boxed = split_rm_type(rm_type)
    response = response or ""
    if boxed:
        response = boxed_rewrite(inner, response)
    if inner == "dapo":
        tail = response[-DAPO_TAIL_CHARS:]
        answers = _DAPO_ANSWER.findall(tail)
        return inner, answers[-1] if answers else None, tail
    if inner == "math":
        answer = last_boxed_content(response)
        text = "" if answer is None else "\\boxed{" + answer + "}"
        return inner, text, text
    if inner == "deepscaler":
        solution = _deepscaler_solution(response)
        answer = None if solution is None else last_boxed_content(solution)
        text = "" if answer is None else "</think>\\boxed{" + answer + "}"
        return inner, text, text
    return inner, response, response


def label_key(label: Any) -> Any:
    """A hashable stand-in for a label that keeps "1", 1 and 1.0 apart (graders see str(label))."""
    if type(label) is str:  # nearly every label: one check, on the per-sample path
        return ("str", label)
    if label is None or isinstance(label, str | int | float | bool):
        return (type(label).__name__, label)
    try:
        return ("json", json.dumps(label, sort_keys=True))
    except (TypeError, ValueError):
        return None


__all__ = [
    "GRADERS",
    "UnknownRewardTypeError",
    "boxed_rewrite",
    "grade",
    "label_key",
    "last_boxed_content",
    "math_verify_reward",
    "reduce",
    "split_rm_type",
]
