"""Rule-based reward graders: pinned against slime's deepscaler / math / dapo / f1 semantics.

Every expectation below is what slime (with pylatexenc 2.11 and sympy 1.14) returns for the
same input, unless a comment says otherwise.
"""

import pytest

from slime_wf.config import RULE_RM_TYPES, CampaignConfig, ConfigError
from slime_wf.rollout.rm_hub import deepscaler, f1, math_dapo_utils, math_utils
from slime_wf.rollout.rm_hub.math_utils import latex_to_text
from slime_wf.rollout.rm_hub.rules import GRADERS, UnknownRewardTypeError, grade

reward = deepscaler.get_deepscaler_rule_based_reward


# ------------------------------------------------------------------------------ boxed answers
@pytest.mark.parametrize(
    "text, boxed, answer",
    [
        ("so \\boxed{\\frac{1}{2}}.", "\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{3} or rather \\boxed{4}", "\\boxed{4}", "4"),
        ("\\boxed{}", "\\boxed{}", ""),
        ("\\boxed{\\frac{1}{2}", None, None),  # never closed
        ("no box here", None, None),
        # \fbox is located but only \boxed{...} is unwrapped, so it yields no answer
        ("\\fbox{5}", "\\fbox{5}", None),
        ("\\boxed{1} then \\fbox{2}", "\\boxed{1}", "1"),  # any \boxed beats \fbox
        # the brace-less form is not recognised: the scan needs a "{"
        ("\\boxed 5", None, None),
    ],
)
def test_last_boxed_and_extract(text, boxed, answer):
    assert math_utils.last_boxed_only_string(text) == boxed
    assert math_utils.extract_answer(text) == answer


def test_remove_boxed():
    assert math_utils.remove_boxed("\\boxed{x^2}") == "x^2"
    assert math_utils.remove_boxed("\\fbox{5}") is None
    assert math_utils.remove_boxed(None) is None


# --------------------------------------------------------------------- MATH normalization
@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("10^\\circ", "10"),
        ("10^{\\circ}", "10"),
        ("\\$5", "5"),
        ("50\\%", "50"),
        ("5 \\text{ cm}", "5"),
        ("\\text{(B)}", "(B)"),
        ("\\frac12", "\\frac{1}{2}"),
        ("\\dfrac{3}{4}", "\\frac{3}{4}"),
        ("\\sqrt2", "\\sqrt{2}"),
        ("3/4", "\\frac{3}{4}"),
        ("0.5", "\\frac{1}{2}"),
        (".5", "\\frac{1}{2}"),
        ("x = 5", "5"),
        ("5.", "5."),  # no trailing-period removal in this normalizer
        ("\\sqrt", "\\sqrt"),  # malformed: compared as written
        ("\\frac", "\\frac"),
    ],
)
def test_mathd_normalize(raw, normalized):
    assert math_utils.mathd_normalize_answer(raw) == normalized


# ------------------------------------------------------------------------ answer equivalence
@pytest.mark.parametrize(
    "given, truth, mathd, sympy_ok",
    [
        ("\\frac{1}{2}", "\\frac12", True, True),
        ("1/2", "\\frac{1}{2}", True, True),
        ("0.5", "\\frac{1}{2}", True, True),
        ("0.50", "\\frac{1}{2}", False, True),
        ("\\dfrac{3}{4}", "\\frac34", True, True),
        ("\\dfrac{3}{4}", "0.75", False, True),
        # unreduced fractions are wrong, whatever the spelling
        ("\\frac{2}{4}", "\\frac12", False, False),
        ("\\frac{2}{4}", "1/2", False, False),
        ("2/4", "1/2", False, False),
        # integer answers must match exactly
        ("4/2", "2", False, False),
        ("5.", "5", False, True),
        ("1,000", "1000", False, True),
        # tuples and intervals: same brackets, element-wise equality
        ("(1, 2)", "(1,2)", True, True),
        ("[1,2]", "(1,2)", False, False),
        ("(1,2]", "(1,2)", False, False),
        ("(2,1)", "(1,2)", False, False),
        ("(1,\\frac{1}{2})", "(1,0.5)", False, True),
        ("(-\\infty, 3]", "(-\\infty,3]", True, True),
        # percents, units and text
        ("50\\%", "50", True, True),
        ("5 \\text{ cm}", "5", True, True),
        ("\\text{(B)}", "(B)", True, True),
        ("\\text{(B)}", "B", False, True),  # a one-element "tuple" is unwrapped
        ("\\text{Monday}", "monday", False, True),
        # symbolic equality
        ("2\\sqrt{2}", "\\sqrt{8}", False, True),
        ("x^2+2x+1", "(x+1)^2", False, True),
        ("\\frac{\\pi}{2}", "\\pi/2", False, True),
        ("1\\frac{1}{2}", "\\frac{3}{2}", False, True),  # mixed number
        ("\\pi", "3.14159", False, False),
        ("x=5", "5", True, False),
        ("9^9^9", "1", False, False),  # refused before sympy sees it
        ("", "5", False, False),
    ],
)
def test_grade_answer(given, truth, mathd, sympy_ok):
    assert math_utils.grade_answer_mathd(given, truth) is mathd
    assert math_utils.grade_answer_sympy(given, truth) is sympy_ok


def test_grade_answer_sympy_never_raises():
    for given in ["\\frac{", "\\sqrt", "((", "__import__('os')", "1/0", "\\begin{pmatrix}", "}{"]:
        assert math_utils.grade_answer_sympy(given, "1") is False


def test_grade_answer_verl():
    assert math_utils.grade_answer_verl("thus \\boxed{\\frac{1}{2}}", "0.5")
    assert math_utils.grade_answer_verl("\\boxed{2} ... \\boxed{3}", "\\boxed{3}")
    assert not math_utils.grade_answer_verl("\\boxed{2} ... \\boxed{3}", "2")
    assert not math_utils.grade_answer_verl("the answer is 3", "3")
    assert not math_utils.grade_answer_verl("\\boxed{0}", 0)  # falsy labels never match
    assert not math_utils.grade_answer_verl("\\boxed{}", "")
    assert math_utils.grade_answer_verl("\\boxed{7}", 7)


# -------------------------------------------------------------------------------- deepscaler
@pytest.mark.parametrize(
    "response, label, expected",
    [
        ("<think>2+3</think> The answer is \\boxed{5}.", "5", 1),
        ("<think>2+3</think> The answer is \\boxed{5}.", "6", 0),
        # only what follows the LAST </think> counts
        ("a</think>\\boxed{5}</think>\\boxed{6}", "5", 0),
        ("a</think>\\boxed{5}</think>\\boxed{6}", "6", 1),
        # ###Response: the text between the first and second marker
        ("prompt ###Response \\boxed{5}", "5", 1),
        ("x ###Response \\boxed{4} ###Response \\boxed{5}", "4", 1),
        ("x ###Response \\boxed{4} ###Response \\boxed{5}", "5", 0),
        ("###Response \\boxed{4} </think> \\boxed{5}", "5", 1),  # </think> takes precedence
        ("\\boxed{5}", "5", 0),  # neither marker
        ("", "5", 0),
        ("</think> the answer is 5", "5", 0),  # no box
        ("</think> \\boxed{5", "5", 0),  # unterminated box
        ("</think> \\fbox{5}", "5", 0),
        ("</think> \\boxed{}", "5", 0),
        ("</think> \\boxed{3} and finally \\boxed{4}", "4", 1),
        ("</think> \\boxed{\\frac{1}{2}}", "1/2", 1),
        ("</think> \\boxed{\\dfrac{1}{2}}", 0.5, 1),
        ("</think> \\boxed{3}", 3.0, 1),
        ("</think> \\boxed{3}", 3, 1),
        ("</think> \\boxed{12}", "\\boxed{12}", 1),
        ("</think> \\boxed{12}", "\\boxed{12", 0),
        ("</think> \\boxed{12}", "", 0),
        ("</think> \\boxed{\\frac{2}{4}}", "\\frac12", 0),
        ("</think> \\boxed{(1, 2)}", "(1,2)", 1),
        ("</think> \\boxed{[1, 2]}", "(1,2)", 0),
        ("</think> \\boxed{50\\%}", "50", 1),
        ("</think> \\boxed{5 \\text{ cm}}", "5", 1),
        ("</think> \\boxed{\\text{(B)}}", "(B)", 1),
        ("</think> \\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1),
    ],
)
def test_deepscaler(response, label, expected):
    assert reward(response, label) == expected


def test_deepscaler_label_type_and_missing_response():
    # slime asserts the label type (AssertionError); a TypeError is raised here instead
    with pytest.raises(TypeError):
        reward("</think> \\boxed{1}", ["1", "2"])
    # slime raises on a None response; here it simply scores 0
    assert reward(None, "1") == 0


# ------------------------------------------------------------------------------------- dapo
def test_dapo_answer_line():
    out = math_dapo_utils.compute_score("Let me think.\nAnswer: 42", "42")
    assert out == {"score": 1.0, "acc": True, "pred": "42"}
    assert math_dapo_utils.compute_score("answer : 42", "42")["acc"]  # case-insensitive
    assert math_dapo_utils.compute_score("Answer: $1,000$", "1000")["acc"]
    assert math_dapo_utils.compute_score("Answer: 42", "42.0")["acc"]  # labels are integers
    last_wins = math_dapo_utils.compute_score("Answer: 41\nAnswer: 42", "42")
    assert last_wins["acc"] and last_wins["pred"] == "42"
    wrong = math_dapo_utils.compute_score("Answer: 41", "42")
    assert wrong == {"score": -1.0, "acc": False, "pred": "41"}
    assert math_dapo_utils.compute_score("\\boxed{42}", "42")["pred"] == "[INVALID]"


def test_dapo_only_last_300_chars():
    tail = "x" * 300
    out = math_dapo_utils.compute_score("Answer: 42\n" + tail, "42")
    assert out == {"score": -1.0, "acc": False, "pred": "[INVALID]"}
    assert math_dapo_utils.compute_score("Answer: 42\n" + tail[:280], "42")["acc"]


def test_dapo_non_numeric_label_raises():
    with pytest.raises(ValueError):
        math_dapo_utils.compute_score("Answer: x", "x")


def test_dapo_strict_box():
    out = math_dapo_utils.compute_score("so \\boxed{42}", "42", strict_box_verify=True)
    assert out == {"score": 1.0, "acc": True, "pred": "42"}
    far = math_dapo_utils.compute_score("\\boxed{42}" + "y" * 150, "42", strict_box_verify=True)
    assert far == {"score": -1.0, "acc": False, "pred": None}  # box outside the last 100 chars
    # compared verbatim, with no normalization
    assert not math_dapo_utils.compute_score("\\boxed{ 42}", "42", strict_box_verify=True)["acc"]
    assert not math_dapo_utils.compute_score("\\boxed{42}", 42, strict_box_verify=True)["acc"]
    assert math_dapo_utils.compute_score("\\boxed{4} \\boxed{42}", "42", strict_box_verify=True)["acc"]
    text = "\\boxed{42}" + "z" * 150
    assert math_dapo_utils.is_correct_strict_box(text, "42", [0, 0, 0, 100]) == (1, "42")
    assert math_dapo_utils.is_correct_strict_box(text, "42", [0, 0, 0, 105]) == (-1, None)


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("x = 10", "10"),
        ("$\\frac{1}{2}$", "\\frac{1}{2}"),
        ("\\frac12", "\\frac{1}{2}"),
        ("\\sqrt3", "\\sqrt{3}"),
        ("5 \\text{ cm}", "5"),
        ("1,000", "1000"),
        ("90^\\circ", "90"),
        ("\\boxed{7}", "7"),
        ("\\text{(A)}", "(A)"),
        ("a $5$ and $6$", "5"),
        ("12 dollars", "12"),
    ],
)
def test_dapo_normalize_final_answer(raw, normalized):
    assert math_dapo_utils.normalize_final_answer(raw) == normalized


def test_dapo_box_helpers():
    assert math_dapo_utils.last_boxed_only_string("\\boxed{a{b}c} d") == "\\boxed{a{b}c}"
    assert math_dapo_utils.last_boxed_only_string("\\boxed{a") is None
    assert math_dapo_utils.last_boxed_only_string("\\fbox{a}") is None
    assert math_dapo_utils.remove_boxed("\\boxed{a{b}c}") == "a{b}c"
    with pytest.raises(AssertionError):
        math_dapo_utils.remove_boxed("\\fbox{a}")
    assert math_dapo_utils.verify("Answer: 3", "3") == (True, "3")


# --------------------------------------------------------------------------------------- f1
def test_f1_normalization():
    assert f1.normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert f1.normalize_answer("an apple a day") == "apple day"


@pytest.mark.parametrize(
    "prediction, truth, expected",
    [
        ("yes", "yes", (1.0, 1.0, 1.0)),
        ("Yes.", "yes", (1.0, 1.0, 1.0)),
        ("yes", "no", (0, 0, 0)),
        ("no", "no answer", (0, 0, 0)),
        ("noanswer", "no answer", (0, 0, 0)),
        ("the cat is yes", "yes", (0, 0, 0)),
        ("The cat!", "a cat", (1.0, 1.0, 1.0)),
        ("black cat", "cat", (2 / 3, 0.5, 1.0)),
        ("dog", "cat", (0, 0, 0)),
        (None, "cat", (0, 0, 0)),
    ],
)
def test_f1_score(prediction, truth, expected):
    assert f1.f1_score(prediction, truth) == pytest.approx(expected)


# ------------------------------------------------------------------ LaTeX -> text rendering
@pytest.mark.parametrize(
    "latex, text",
    [
        ("\\frac{1}{2}", "1/2"),
        ("\\frac{x+1}{2}", "x+1/2"),  # no parentheses, exactly like pylatexenc
        ("\\frac12 3", "1/2 3"),
        ("\\sqrt[3]{8}", "√(8)"),
        ("2\\sqrt2", "2√(2)"),
        ("\\left(1,2\\right)", "(1,2)"),
        ("\\text{(B)}", "(B)"),
        ("\\pi r^2", "πr^2"),
        ("x \\in \\mathbb{R}", "x ∈ℝ"),
        ("\\operatorname{lcm}(2,3)", "lcm(2,3)"),  # unknown macros vanish
        ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "[ 1; 2 ]"),
        ("\\frac{1}", "%s/%s1"),  # missing arguments: the macro gets none
        ("a } b", "a  b"),
    ],
)
def test_latex_to_text(latex, text):
    assert latex_to_text(latex) == text


def test_latex_to_text_rejects_like_pylatexenc():
    with pytest.raises(KeyError):
        latex_to_text("\\sqrt")
    with pytest.raises(ValueError):
        latex_to_text("\\begin{pmatrix}")


# ------------------------------------------------------------------------- pathological input
def test_pathological_inputs_finish():
    """Inputs that make naive graders explode (huge powers, deep nesting, long runs) get an answer.
    A regression hangs here, and the suite's per-test timeout reports it; no speed is asserted."""
    assert not math_utils.grade_answer_sympy("2^{2^{2^{100}}}", "1")
    assert not math_utils.grade_answer_mathd("{" * 3000 + "1", "1")
    assert not math_utils.grade_answer_sympy("{" * 3000 + "\\frac", "1")
    assert not math_utils.grade_answer_sympy("1," * 3000 + "1", "1")
    assert math_dapo_utils.normalize_final_answer("$" + "a$b" * 3000) == "a"
    assert not math_dapo_utils.compute_score("Answer" + " " * 5000 + "x", "1")["acc"]
    assert reward("</think>" + "\\boxed{" * 2000, "1") == 0


def test_the_rule_types_are_the_configs():
    assert set(GRADERS) == set(RULE_RM_TYPES)
    for bad in ("maths", "boxed_remote_rm"):
        with pytest.raises(UnknownRewardTypeError) as graded:
            grade(bad, "\\boxed{1}", "1")
        with pytest.raises(ConfigError) as loaded:
            CampaignConfig.from_dict({"reward": {"rm_type": bad}})
        message = str(graded.value)
        assert message.startswith(f"unknown rm_type {bad!r}; allowed:") and message in str(loaded.value)
