"""SQuAD answer normalisation, exact match and token F1 (the official SQuAD v1.1 evaluation rules).

s3ray/tasks/qa.py owns the task's metric; when it exports the same three functions they are used, so the
student's per-row `correct`/`f1` columns and the task metric can never disagree.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def _normalize_answer(s: str) -> str:
    """Lower case, drop punctuation and articles (a/an/the), collapse whitespace."""
    s = "".join(ch for ch in str(s).lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _exact_match(prediction: str, gold: str) -> bool:
    return _normalize_answer(prediction) == _normalize_answer(gold)


def _token_f1(prediction: str, gold: str) -> float:
    pred, ref = _normalize_answer(prediction).split(), _normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


try:  # the task module is the owner once it exists
    from s3ray.tasks.qa import exact_match, normalize_answer, token_f1  # type: ignore[attr-defined]
except ImportError:
    normalize_answer, exact_match, token_f1 = _normalize_answer, _exact_match, _token_f1

__all__ = ["exact_match", "normalize_answer", "token_f1"]
