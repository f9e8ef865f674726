"""DAPO math reward (``rm_type="dapo"``): Minerva-style ``Answer:`` matching or strict boxes.

Only the tail of a response is graded.  By default the last ``Answer: ...`` line is normalized
with the Minerva rules (Lewkowycz et al., 2022, appendix) and compared as a string with the
integer label; ``strict_box_verify`` instead requires the last ``\\boxed{}`` near the end to
equal the label verbatim.
"""

from __future__ import annotations

import re
from typing import cast

__all__ = [
    "compute_score",
    "is_correct_minerva",
    "is_correct_strict_box",
    "last_boxed_only_string",
    "normalize_final_answer",
    "remove_boxed",
    "verify",
]

# Applied in order with str.replace, then the removals below.
SUBSTITUTIONS: list[tuple[str, str]] = [
    ("an ", ""),
    ("a ", ""),
    (".$", "$"),
    ("\\$", ""),
    ("\\ ", ""),
    (" ", ""),
    ("mbox", "text"),
    (",\\text{and}", ","),
    ("\\text{and}", ","),
    ("\\text{m}", "\\text{}"),
]

# Units, filler words and TeX decorations deleted from answers, in this order.
REMOVED_EXPRESSIONS: list[str] = [
    "square",
    "ways",
    "integers",
    "dollars",
    "mph",
    "inches",
    "hours",
    "km",
    "units",
    "\\ldots",
    "sue",
    "points",
    "feet",
    "minutes",
    "digits",
    "cents",
    "degrees",
    "cm",
    "gm",
    "pounds",
    "meters",
    "meals",
    "edges",
    "students",
    "childrentickets",
    "multiples",
    "\\text{s}",
    "\\text{.}",
    "\\text{\ns}",
    "\\text{}^2",
    "\\text{}^3",
    "\\text{\n}",
    "\\text{}",
    "\\mathrm{th}",
    "^\\circ",
    "^{\\circ}",
    "\\;",
    ",\\!",
    "{,}",
    '"',
    "\\dots",
    "<|im_end|>",
    "<|endoftext|>",
]

_ANSWER_PATTERN = r"(?i)Answer\s*:\s*([^\n]+)"
_TEXT_GROUP = re.compile(r"(\\text\{)(.*?)(\})")
_TEXTBF_GROUP = re.compile(r"(\\textbf\{)(.*?)(\})")
_OVERLINE_GROUP = re.compile(r"(\\overline\{)(.*?)(\})")
_BOXED_GROUP = re.compile(r"(\\boxed\{)(.*)(\})")
_SHORT_FRAC = re.compile(r"(frac)([^{])(.)")
_SHORT_SQRT = re.compile(r"(sqrt)([^{])")


def last_boxed_only_string(string: str) -> str | None:
    """The last ``\\boxed{...}`` with balanced braces, or None."""
    start = string.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for i in range(start, len(string)):
        if string[i] == "{":
            depth += 1
        elif string[i] == "}":
            depth -= 1
            if depth == 0:
                return string[start : i + 1]
    return None


def remove_boxed(s: str | None) -> str:
    """Content of ``\\boxed{...}``; anything else is a caller error (``AssertionError``)."""
    prefix = "\\boxed{"
    assert s is not None and s[: len(prefix)] == prefix, f"box error: {s}"
    assert s[-1] == "}", f"box error: {s}"
    return s[len(prefix) : -1]


def _keep_first_math_span(text: str) -> str:
    """On each line holding two or more ``$``, keep only the first ``$...$`` span.

    Same result as ``re.sub(r"(.*?)(\\$)(.*?)(\\$)(.*)", "$\\3$", text)`` (``.`` stops at
    newlines) without the regex's super-linear backtracking.
    """
    lines = text.split("\n")
    for i, line in enumerate(lines):
        first = line.find("$")
        if first < 0:
            continue
        second = line.find("$", first + 1)
        if second >= 0:
            lines[i] = "$" + line[first + 1 : second] + "$"
    return "\n".join(lines)


def normalize_final_answer(final_answer: str | int) -> str:
    """Minerva normalization of a final answer to a quantitative question."""
    final_answer = str(final_answer).split("=")[-1]
    for before, after in SUBSTITUTIONS:
        final_answer = final_answer.replace(before, after)
    for expr in REMOVED_EXPRESSIONS:
        final_answer = final_answer.replace(expr, "")

    # keep the math, drop text-formatting wrappers
    final_answer = _keep_first_math_span(final_answer)
    final_answer = _TEXT_GROUP.sub(r"\2", final_answer)
    final_answer = _TEXTBF_GROUP.sub(r"\2", final_answer)
    final_answer = _OVERLINE_GROUP.sub(r"\2", final_answer)
    final_answer = _BOXED_GROUP.sub(r"\2", final_answer)

    # shorthand TeX: \fracab -> \frac{a}{b}, \sqrta -> \sqrt{a}
    final_answer = _SHORT_FRAC.sub(r"frac{\2}{\3}", final_answer)
    final_answer = _SHORT_SQRT.sub(r"sqrt{\2}", final_answer)
    final_answer = final_answer.replace("$", "")

    if final_answer.replace(",", "").isdigit():  # "1,000" -> "1000"
        final_answer = final_answer.replace(",", "")
    return final_answer.strip()


def is_correct_minerva(
    solution_str: str,
    gt: str | int,
    gt_need_extract: bool = False,
    answer_pattern: str = _ANSWER_PATTERN,
) -> tuple[bool, str]:
    """Compare the last ``Answer:`` line with ``gt``; returns ``(correct, normalized_pred)``.

    DAPO labels are integers: the normalized label goes through ``str(int(float(gt)))``, so a
    label that is not a number raises ``ValueError`` (as in the reference).
    """
    matches = re.findall(answer_pattern, solution_str)
    pred = normalize_final_answer(matches[-1] if matches else "[INVALID]")
    if gt_need_extract:
        # a label that needs extracting is a solution text holding a \boxed{} answer
        gt = normalize_final_answer(remove_boxed(last_boxed_only_string(cast(str, gt))))
    else:
        gt = normalize_final_answer(gt)
    gt = str(int(float(gt)))
    return pred == gt, pred


def is_correct_strict_box(
    pred: str, gt: str, pause_tokens_index: list[int] | None = None
) -> tuple[int, str | None]:
    """``(1 | -1, boxed_content)``: the last box in the final 100 characters must equal ``gt``."""
    if pause_tokens_index is not None:
        assert len(pause_tokens_index) == 4
        pred = pred[pause_tokens_index[-1] - 100 :]
    else:
        pred = pred[-100:]
    boxed = last_boxed_only_string(pred)
    extracted = remove_boxed(boxed) if boxed is not None else None
    return (1 if extracted == gt else -1), extracted


def verify(
    solution_str: str,
    answer: str,
    strict_box_verify: bool = False,
    pause_tokens_index: list[int] | None = None,
) -> tuple[bool, str | None]:
    """``(correct, prediction)`` under the selected rule."""
    if strict_box_verify:
        correct, pred = is_correct_strict_box(solution_str, answer, pause_tokens_index)
        return correct == 1, pred
    return is_correct_minerva(solution_str, answer)


def compute_score(
    solution_str: str,
    ground_truth: str,
    strict_box_verify: bool = False,
    pause_tokens_index: list[int] | None = None,
) -> dict:
    """``{"score": 1.0 | -1.0, "acc": bool, "pred": str | None}`` for one response.

    Only the last 300 characters are graded (the longest MATH-500 answer has 159).
    """
    solution_str = solution_str[-300:]
    correct, pred = verify(solution_str, ground_truth, strict_box_verify, pause_tokens_index)
    return {"score": 1.0 if correct else -1.0, "acc": correct, "pred": pred}
