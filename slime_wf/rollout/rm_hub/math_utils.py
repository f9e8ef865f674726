"""Rule-based math answer checking (``rm_type`` "math" and the deepscaler reward).

Two graders are combined, as in slime / deepscaler:

* :func:`grade_answer_mathd` -- string match after the Hendrycks MATH normalization.
* :func:`grade_answer_sympy` -- the PRM800K grader: a more aggressive normalization, tuple and
  interval splitting, strict rules for integers and unreduced fractions, and otherwise
  ``sympy.simplify(a - b) == 0``.

Every decision (normalization order, regexes, guards against slow sympy input) mirrors the
reference so that rewards are identical for the same strings.  LaTeX is rendered to text by
``pylatexenc``'s ``LatexNodes2Text``, as slime does.
"""

from __future__ import annotations

import logging
import re

import sympy
from pylatexenc import latex2text  # type: ignore[import-untyped]
from sympy.parsing import sympy_parser

__all__ = [
    "extract_answer",
    "extract_boxed_answer",
    "grade_answer_mathd",
    "grade_answer_sympy",
    "grade_answer_verl",
    "last_boxed_only_string",
    "latex_to_text",
    "mathd_normalize_answer",
    "remove_boxed",
]

_ENCLOSING_TEXT = re.compile(r"^\\text\{(?P<text>.+?)\}$")

# Model answers are often malformed LaTeX (a macro short of its arguments); pylatexenc warns about each and
# renders them all the same, so its warnings would only flood the graders' logs.
logging.getLogger("pylatexenc").setLevel(logging.ERROR)
_LATEX_TO_TEXT: latex2text.LatexNodes2Text | None = None


def latex_to_text(latex: str) -> str:
    """``pylatexenc``'s plain text of ``latex`` with its default settings, as slime's grader gets it (one
    converter per process: it holds only its settings, and building it costs more than a conversion)."""
    global _LATEX_TO_TEXT
    if _LATEX_TO_TEXT is None:
        _LATEX_TO_TEXT = latex2text.LatexNodes2Text()
    return _LATEX_TO_TEXT.latex_to_text(latex)


# ------------------------------------------------------------------------------ boxed answers
def last_boxed_only_string(string: str) -> str | None:
    """The last ``\\boxed...`` (or, when there is none, ``\\fbox...``) up to its matching brace.

    Returns None when neither appears or the braces never balance.  A brace-less
    ``\\boxed 5`` is not recognised (the scan needs a ``{``), as in the reference.
    """
    start = string.rfind("\\boxed")
    if start < 0:
        start = string.rfind("\\fbox")
        if start < 0:
            return None
    depth = 0
    for i in range(start, len(string)):
        ch = string[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return string[start : i + 1]
    return None


def remove_boxed(s: str | None) -> str | None:
    """Content of ``\\boxed{...}``; None for anything else (including ``\\fbox{...}``)."""
    prefix = "\\boxed{"
    if not isinstance(s, str) or not s.startswith(prefix) or not s.endswith("}"):
        return None
    return s[len(prefix) : -1]


def extract_boxed_answer(solution: str) -> str | None:
    return remove_boxed(last_boxed_only_string(solution))


def extract_answer(passage: str) -> str | None:
    """Content of the last box; None unless the passage contains ``\\boxed``."""
    if "\\boxed" in passage:
        return extract_boxed_answer(passage)
    return None


# --------------------------------------------------------------- Hendrycks MATH normalization
class _Malformed(Exception):
    """The MATH normalizer hit input it cannot handle; the raw answer is compared instead."""


def _fix_fracs(string: str) -> str:
    r"""``\frac12`` -> ``\frac{1}{2}``, ``\frac1{7}`` -> ``\frac{1}{7}``."""
    pieces = string.split("\\frac")
    out = pieces[0]
    for piece in pieces[1:]:
        out += "\\frac"
        if not piece:
            raise _Malformed
        if piece[0] == "{":
            out += piece
            continue
        if len(piece) < 2:
            return string
        num, second, rest = piece[0], piece[1], piece[2:]
        if second == "{":
            out += "{" + num + "}" + second + rest
        else:
            out += "{" + num + "}{" + second + "}" + rest
    return out


def _fix_a_slash_b(string: str) -> str:
    parts = string.split("/")
    if len(parts) != 2:
        return string
    try:
        num, den = int(parts[0]), int(parts[1])
    except ValueError:
        return string
    if string != f"{num}/{den}":
        return string
    return "\\frac{" + str(num) + "}{" + str(den) + "}"


def _remove_right_units(string: str) -> str:
    # "\text{ " (with the space) marks a trailing unit in the MATH data.
    if "\\text{ " not in string:
        return string
    parts = string.split("\\text{ ")
    if len(parts) != 2:
        raise _Malformed
    return parts[0]


def _fix_sqrt(string: str) -> str:
    r"""``\sqrt3`` -> ``\sqrt{3}`` (only the first character is wrapped)."""
    if "\\sqrt" not in string:
        return string
    pieces = string.split("\\sqrt")
    out = pieces[0]
    for piece in pieces[1:]:
        if not piece:
            raise _Malformed
        if piece[0] == "{":
            out += "\\sqrt" + piece
        else:
            out += "\\sqrt{" + piece[0] + "}" + piece[1:]
    return out


def _strip_string(string: str) -> str:
    string = string.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    string = string.replace("tfrac", "frac").replace("dfrac", "frac")
    string = string.replace("\\left", "").replace("\\right", "")
    string = string.replace("^{\\circ}", "").replace("^\\circ", "")
    string = string.replace("\\$", "")
    string = _remove_right_units(string)
    string = string.replace("\\%", "")
    # a leading "." gets a zero: " .5" -> " 0.5", "{.5" -> "{0.5", ".5" -> "0.5"
    string = string.replace(" .", " 0.").replace("{.", "{0.")
    if not string:
        return string
    if string[0] == ".":
        string = "0" + string
    # drop a short "x =" / "k =" prefix
    sides = string.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        string = sides[1]
    string = _fix_sqrt(string)
    string = string.replace(" ", "")
    string = _fix_fracs(string)
    if string == "0.5":
        string = "\\frac{1}{2}"
    return _fix_a_slash_b(string)


def mathd_normalize_answer(answer: str | None) -> str | None:
    """Hendrycks MATH normalization; falls back to the (unwrapped) answer on malformed input."""
    if answer is None:
        return None
    answer = answer.strip()
    try:
        m = _ENCLOSING_TEXT.search(answer)
        if m is not None:
            answer = m.group("text").strip()
        return _strip_string(answer)
    except _Malformed:
        return answer


def grade_answer_mathd(given_answer: str | None, ground_truth: str | None) -> bool:
    return mathd_normalize_answer(ground_truth) == mathd_normalize_answer(given_answer)


# ------------------------------------------------------------------- PRM800K normalization
_UNITS = (
    "degree",
    "cm",
    "centimeter",
    "meter",
    "mile",
    "second",
    "minute",
    "hour",
    "day",
    "week",
    "month",
    "year",
    "foot",
    "feet",
    "inch",
    "yard",
)
_UNIT_PATTERNS = [re.compile(unit + r"(es)?(s)? *(\^[0-9]+)?") for unit in _UNITS]
_CARET_CIRC = re.compile(r"\^ *\\circ")
_COMMA_THIN_SPACE = re.compile(r",\\! *")
_DASH_SPACES = re.compile(r"- *")
_MIXED_NUMBER = re.compile(r"([0-9]) +([0-9])")
_THOUSANDS_COMMA = re.compile(r"(\d)(,)(\d\d\d)($|\D)")
_PLAIN_FRACTION = re.compile(r"^-?[0-9]+.?/0*[1-9][0-9]*.?$")
# inputs sympy may take forever on; such answers are simply not compared symbolically
_SLOW_SUBSTRINGS = ("^{", "^(")
_SLOW_PATTERNS = (re.compile(r"\^[0-9]+\^"), re.compile(r"\^[0-9][0-9]+"))
_TUPLE_CHARS = "()[]"
_UNICODE_TO_SYMPY = (("√", "sqrt"), ("π", "pi"), ("∞", "inf"), ("∪", "U"), ("·", "*"), ("×", "*"))


def _latex_to_sympy_text(expr: str) -> str:
    expr = expr.replace("\\tfrac", "\\frac").replace("\\dfrac", "\\frac")
    expr = expr.replace("\\frac", " \\frac")  # keeps mixed numbers like 1\frac{1}{2} apart
    expr = latex_to_text(expr)
    for symbol, name in _UNICODE_TO_SYMPY:
        expr = expr.replace(symbol, name)
    return expr.strip()


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_int(x: float) -> bool:
    try:
        return abs(x - int(round(x))) <= 1e-7
    except (OverflowError, ValueError):
        return False


def _is_frac(expr: str) -> bool:
    return _PLAIN_FRACTION.search(expr) is not None


def _strip_properly_formatted_commas(expr: str) -> str:
    """Drop thousands separators ("1,000" -> "1000") but keep tuple commas."""
    while True:
        stripped = _THOUSANDS_COMMA.sub(r"\1\3\4", expr)
        if stripped == expr:
            return stripped
        expr = stripped


def _str_is_int(text: str) -> bool:
    try:
        return _is_int(float(_strip_properly_formatted_commas(text)))
    except ValueError:
        return False


def _str_to_int(text: str) -> int:
    return int(float(text.replace(",", "")))


def _normalize(expr: str | None) -> str | None:
    """PRM800K answer normalization (units, text, percent, LaTeX -> text, case)."""
    if expr is None:
        return None
    m = _ENCLOSING_TEXT.search(expr)
    if m is not None:
        expr = m.group("text")
    expr = expr.replace("\\%", "%").replace("\\$", "$").replace("$", "").replace("%", "")
    expr = expr.replace(" or ", " , ").replace(" and ", " , ")
    expr = expr.replace("million", "*10^6").replace("billion", "*10^9")
    expr = expr.replace("trillion", "*10^12")
    for pattern in _UNIT_PATTERNS:
        expr = pattern.sub("", expr)
    expr = _CARET_CIRC.sub("", expr)
    if expr and expr[0] == "{" and expr[-1] == "}":
        expr = expr[1:-1]
    expr = _COMMA_THIN_SPACE.sub("", expr)
    if _is_float(expr) and _is_int(float(expr)):
        expr = str(int(round(float(expr))))
    if "\\" in expr:
        try:
            expr = _latex_to_sympy_text(expr)
        except Exception:  # unrenderable LaTeX is compared as written
            pass
    expr = _DASH_SPACES.sub("-", expr)
    expr = _MIXED_NUMBER.sub(r"\1+\2", expr)  # "7 3/4" -> "7+3/4"
    expr = expr.replace(" ", "").replace("{", "").replace("}", "")
    expr = expr.lower()
    if _str_is_int(expr):
        expr = str(_str_to_int(expr))
    return expr


def _count_unknown_letters(expr: str) -> int:
    expr = expr.replace("sqrt", "").replace("frac", "")
    return len({ch for ch in expr if ch.isalpha()})


def _should_allow_eval(expr: str) -> bool:
    # no free text or functions of more than two variables, nothing that may blow up sympy
    if _count_unknown_letters(expr) > 2:
        return False
    if any(bad in expr for bad in _SLOW_SUBSTRINGS):
        return False
    return not any(p.search(expr) for p in _SLOW_PATTERNS)


def _sympy_parse(expr: str):
    transformations = sympy_parser.standard_transformations + (
        sympy_parser.implicit_multiplication_application,
    )
    return sympy_parser.parse_expr(expr.replace("^", "**"), transformations=transformations)


def _are_equal_under_sympy(ground_truth_normalized: str, given_normalized: str, tol: float = 0.0) -> bool:
    try:
        expr = f"({ground_truth_normalized})-({given_normalized})"
        if _should_allow_eval(expr):
            difference = sympy.simplify(_sympy_parse(expr))
            if abs(difference) <= tol:
                return True
    except Exception:  # unparsable, non-numeric or undecidable: not equal
        pass
    return False


def _split_tuple(expr: str) -> list[str]:
    """Elements of a flat tuple/interval like ``(1,2]``; anything else is one element."""
    expr = _strip_properly_formatted_commas(expr)
    if not expr:
        return []
    if (
        len(expr) > 2
        and expr[0] in _TUPLE_CHARS
        and expr[-1] in _TUPLE_CHARS
        and not any(ch in expr[1:-1] for ch in _TUPLE_CHARS)
    ):
        return [elem.strip() for elem in expr[1:-1].split(",")]
    return [expr]


def grade_answer_sympy(given_answer: str | None, ground_truth: str | None, tol: float = 0.0) -> bool:
    """PRM800K-style equivalence check; never raises on odd input."""
    ground_truth_normalized = _normalize(ground_truth)
    given_normalized = _normalize(given_answer)
    if ground_truth_normalized is None or given_normalized is None:
        return False
    if ground_truth_normalized == given_normalized:
        return True
    if not given_normalized:
        return False

    ground_truth_elems = _split_tuple(ground_truth_normalized)
    given_elems = _split_tuple(given_normalized)
    if len(ground_truth_elems) > 1 and (
        ground_truth_normalized[0] != given_normalized[0]
        or ground_truth_normalized[-1] != given_normalized[-1]
    ):
        return False  # bracket types differ, e.g. (1,2) vs [1,2]
    if len(ground_truth_elems) != len(given_elems):
        return False
    is_correct = False
    for truth_elem, given_elem in zip(ground_truth_elems, given_elems, strict=True):
        if _is_frac(truth_elem) and _is_frac(given_elem):
            # unreduced fractions are wrong, so fractions must match exactly
            is_correct = truth_elem == given_elem
        elif _str_is_int(truth_elem) != _str_is_int(given_elem):
            is_correct = False
        else:
            is_correct = _are_equal_under_sympy(truth_elem, given_elem, tol=tol)
        if not is_correct:
            break
    return is_correct


def grade_answer_verl(solution_str: str | None, ground_truth) -> bool:
    """``rm_type="math"``: the last boxed answer of the response against the label.

    A boxed label is unboxed first.  A falsy label (``""``, ``None``, ``0``) or a response
    without a ``\\boxed{}`` answer is wrong.
    """
    if not ground_truth or solution_str is None:
        return False
    ground_truth = str(ground_truth)
    if "\\boxed" in ground_truth:
        ground_truth = extract_answer(ground_truth)
    given_answer = extract_answer(solution_str)
    if given_answer is None:
        return False
    return grade_answer_mathd(given_answer, ground_truth) or grade_answer_sympy(given_answer, ground_truth)
