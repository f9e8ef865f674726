"""DeepScaleR rule-based reward (``rm_type="deepscaler"``).

The gradeable part of a response is whatever follows the last ``</think>`` (or, failing that,
the first ``###Response``); its last ``\\boxed{}`` answer is checked against the label with the
MATH and PRM800K graders of :mod:`.math_utils`.
"""

from __future__ import annotations

from .math_utils import extract_answer, grade_answer_mathd, grade_answer_sympy

__all__ = ["get_deepscaler_rule_based_reward"]


def get_deepscaler_rule_based_reward(response: str | None, label: str | int | float) -> int:
    """1 if the boxed answer after the reasoning matches ``label``, else 0.

    Responses with neither ``</think>`` nor ``###Response`` score 0, as do responses without a
    boxed answer and empty labels.  ``label`` may be a string, int or float, or a string holding
    ``\\boxed{...}`` (which is unboxed).  Lists are rejected with ``TypeError``.
    """
    if not response:
        return 0
    if "</think>" in response:
        solution = response.split("</think>")[-1]
    elif "###Response" in response:
        solution = response.split("###Response")[1]
    else:
        return 0

    model_answer = extract_answer(solution)
    if model_answer is None:
        return 0
    if label == "":
        return 0
    if not isinstance(label, str | int | float):
        raise TypeError(f"deepscaler label must be str, int or float, got {type(label).__name__}")

    truth = str(label)
    if "\\boxed" in truth:
        boxed = extract_answer(truth)
        if boxed is None:
            return 0
        truth = boxed
    if grade_answer_mathd(model_answer, truth) or grade_answer_sympy(model_answer, truth):
        return 1
    return 0
