"""Extractive question answering (AdversarialQA, SQuAD-style data).

Seed synthesis keeps a real paragraph (`context`) and asks the teacher for an answer span copied from it plus
a question whose answer is that span, in a fixed two-line format ("Answer: ...\\nQuestion: ..."). The answer
is written first so the question is conditioned on it (the paper's "paragraph + answer" setting). EES keeps
the failed row's paragraph and asks for a new question like the one the student got wrong.

The metric is SQuAD's: exact match and token F1 after `normalize_answer`.
"""

from __future__ import annotations

import collections
import re
import string
from dataclasses import dataclass

from s3ray.tasks.base import _REFUSAL, ParseError, Task
from s3ray.teacher.types import Message

# --- SQuAD metric (module functions: the student predictor imports them) -------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD v1.1 normalisation: lower case, no punctuation, no articles, single spaces."""
    s = (s or "").lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """Bag-of-tokens F1 between normalised answers (SQuAD v1.1 definition)."""
    p = normalize_answer(prediction).split()
    g = normalize_answer(gold).split()
    if not p or not g:
        # Both empty counts as a match; one empty is a miss.
        return float(p == g)
    common = collections.Counter(p) & collections.Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def qa_metrics(predictions: list[str], golds: list[str]) -> dict[str, float]:
    n = len(golds)
    if n == 0:
        return {"exact_match": float("nan"), "f1": float("nan"), "n": 0}
    em = sum(exact_match(p, g) for p, g in zip(predictions, golds)) / n
    f1 = sum(token_f1(p, g) for p, g in zip(predictions, golds)) / n
    return {"exact_match": em, "f1": f1, "n": n}


# --- teacher reply parsing -----------------------------------------------------------------------------

_ANSWER = re.compile(r"^\W*answer\s*(?:span)?\s*[:\-]\s*(.*)$", re.IGNORECASE)
_QUESTION = re.compile(r"^\W*question\s*[:\-]\s*(.*)$", re.IGNORECASE)
_QUOTES = "\"'`“”‘’*"
MAX_ANSWER_WORDS = 30  # SQuAD answers are short spans; a sentence-long "answer" is a failed reply.


def _strip(s: str) -> str:
    return s.strip(_QUOTES + " \t")


def _find_field(lines: list[str], pattern: re.Pattern) -> str | None:
    for line in lines:
        m = pattern.match(line)
        if m:
            return _strip(m.group(1))
    return None


def find_span(answer: str, context: str) -> tuple[str, int] | None:
    """The answer as written in the context and its character offset; exact match first, then
    case-insensitive, then with a trailing full stop removed. None when it is not in the context."""
    for cand in dict.fromkeys([answer, answer.rstrip(".,;:!?").strip()]):
        if not cand:
            continue
        i = context.find(cand)
        if i >= 0:
            return context[i : i + len(cand)], i
        i = context.lower().find(cand.lower())
        if i >= 0:
            return context[i : i + len(cand)], i
    return None


def _system() -> Message:
    return {
        "role": "system",
        "content": "You write reading-comprehension questions whose answers are exact phrases copied "
        "from a given paragraph.",
    }


_FORMAT = (
    "Reply in exactly two lines:\nAnswer: <a short phrase copied word for word from the paragraph>\n"
    "Question: <a question ending with '?' whose answer is that phrase>"
)


@dataclass
class ExtractiveQATask(Task):
    """Rows: {"context", "question", "answer", "answer_start"}; the answer is a span of the context."""

    type: str = "extractive_qa"
    fields: tuple[str, ...] = ("context", "question", "answer")
    primary_metric: str = "f1"
    context_fields: tuple[str, ...] = ("context",)
    description: str = "paragraph"

    # --- data --------------------------------------------------------------------------------
    def validate_row(self, row: dict) -> str | None:
        problem = super().validate_row(row)
        if problem:
            return problem
        start = row.get("answer_start")
        ctx, ans = row["context"], row["answer"]
        if start is None:
            return "field 'answer_start' is missing (character offset of the answer in the context)"
        try:
            start = int(start)
        except (TypeError, ValueError):
            return f"answer_start {start!r} is not an integer"
        if ctx[start : start + len(ans)] != ans:
            return f"answer_start {start} does not point at the answer {ans!r} in the context"
        return None

    # --- prompts -----------------------------------------------------------------------------
    def rationale_messages(self, label: str, k: int) -> list[Message]:
        raise NotImplementedError("extractive QA has no labels, so no rationales (as in the paper)")

    def seed_messages(
        self, label: str | None = None, rationales: list[str] | None = None, context: dict | None = None
    ) -> list[Message]:
        if not context or not context.get("context"):
            raise ValueError("extractive QA seed synthesis needs a real row with a 'context' paragraph")
        ask = (
            f'Here is a {self.description}:\n"{context["context"]}"\n\n'
            "Pick a short phrase from it (a name, number, date or few words) and write a question "
            f"that this phrase answers.\n{_FORMAT}"
        )
        return [_system(), {"role": "user", "content": ask}]

    def ees_messages(self, error_row: dict) -> list[Message]:
        ask = (
            f'Here is a {self.description}:\n"{error_row["context"]}"\n\n'
            f'A reader answered this question about it wrongly: "{error_row["question"]}" '
            f'(correct answer: "{error_row["answer"]}").\n'
            "Write a new, different question of the same kind about this paragraph, with its answer "
            f"copied from the paragraph.\n{_FORMAT}"
        )
        return [_system(), {"role": "user", "content": ask}]

    # --- parsing -----------------------------------------------------------------------------
    def parse_example(self, text: str, label: str | None, context: dict | None) -> dict:
        if text is None or not text.strip():
            raise ParseError("empty")
        if not context or not context.get("context"):
            raise ValueError("parse_example needs the row whose context was kept")
        paragraph = context["context"]
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        answer = _find_field(lines, _ANSWER)
        question = _find_field(lines, _QUESTION)
        if answer is None and question is None and _REFUSAL.search(text):
            raise ParseError("refusal")
        if not answer:
            raise ParseError("no_answer", "expected a line 'Answer: ...'")
        if not question:
            raise ParseError("no_question", "expected a line 'Question: ...'")
        if _REFUSAL.search(question) or _REFUSAL.search(answer):
            raise ParseError("refusal")
        if len(answer.split()) > MAX_ANSWER_WORDS:
            raise ParseError("answer_too_long", f"{len(answer.split())} words > {MAX_ANSWER_WORDS}")
        span = find_span(answer, paragraph)
        if span is None:
            raise ParseError("answer_not_in_context", answer[:80])
        answer, start = span
        if "?" not in question:
            raise ParseError("not_a_question", question[:80])
        question = question[: question.rfind("?") + 1].strip()  # drop trailing commentary
        if len(question) < self.min_chars:
            raise ParseError("too_short", f"{len(question)} < {self.min_chars} chars")
        if len(question) > self.max_chars:
            raise ParseError("too_long", f"{len(question)} > {self.max_chars} chars")
        if normalize_answer(answer) and normalize_answer(answer) in normalize_answer(question):
            raise ParseError("question_contains_answer")
        return {
            "context": paragraph,
            "question": question,
            "answer": answer,
            "answer_start": start,
            "label": None,
        }

    def dedup_text(self, row: dict) -> str:
        return f"{row['question']} {row['answer']}"

    # --- student and metric ------------------------------------------------------------------
    def student_inputs(self, row: dict) -> tuple[str, str | None]:
        # Question first, as SQuAD models read it; truncation then cuts the paragraph, not the question.
        return row["question"], row["context"]

    def metrics(self, predictions: list, golds: list) -> dict[str, float]:
        return qa_metrics(predictions, golds)
