"""Token-level F1 between a prediction and a reference answer (``rm_type="f1"``, SQuAD style)."""

from __future__ import annotations

import re
import string
from collections import Counter

__all__ = ["f1_score", "normalize_answer"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)
_BINARY_ANSWERS = ("yes", "no", "noanswer")


def normalize_answer(s: str) -> str:
    """Lowercase, drop ASCII punctuation and the articles a/an/the, collapse whitespace."""
    text = s.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def f1_score(prediction: str | None, ground_truth: str) -> tuple[float, float, float]:
    """``(f1, precision, recall)`` over normalized whitespace tokens.

    A yes/no/noanswer answer on either side only scores when both sides agree exactly, and a
    missing prediction or one with no tokens in common scores ``(0, 0, 0)``.
    """
    zero = (0, 0, 0)
    if prediction is None:
        return zero
    pred = normalize_answer(prediction)
    truth = normalize_answer(ground_truth)
    if (pred in _BINARY_ANSWERS or truth in _BINARY_ANSWERS) and pred != truth:
        return zero

    pred_tokens = pred.split()
    truth_tokens = truth.split()
    num_same = sum((Counter(pred_tokens) & Counter(truth_tokens)).values())
    if num_same == 0:
        return zero
    precision = num_same / len(pred_tokens)
    recall = num_same / len(truth_tokens)
    return (2 * precision * recall) / (precision + recall), precision, recall
