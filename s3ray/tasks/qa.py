"""Extractive question answering (AdversarialQA, SQuAD-style data).

Seed synthesis is the paper's "paragraph + answer -> question": it keeps a real paragraph (`context`) and
an answer span of it, and the teacher writes the question. Who picks the span is `answers`:
- "picked" (default): s3ray picks a name, number or noun phrase of the paragraph (`answer_spans`), so even a
  135M teacher only has to write one question;
- "teacher": a strong teacher picks it, replying "Answer: ...\\nQuestion: ..." (the answer first, so the
  question is conditioned on it); the answer must then be found in the paragraph.
EES keeps the failed row's paragraph and its gold answer and asks for a new question like the one the
student got wrong.

The metric is SQuAD's: exact match and token F1 after `normalize_answer`.
"""

from __future__ import annotations

import collections
import logging
import random
import re
import string
from dataclasses import dataclass

import pyarrow as pa

from s3ray.tasks.answer_spans import STOP_WORDS, pick_span, sentence_around
from s3ray.tasks.base import _REFUSAL, ParseError, Task
from s3ray.teacher.types import Message

log = logging.getLogger("s3ray.tasks")

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


def _question_for_answer(context: dict, avoid: str | None = None) -> list[Message]:
    """Few-shot "sentence + answer -> question" turns. Only the answer's sentence is shown: SmolLM2-135M kept
    58% of its questions this way against 38% when shown the whole paragraph (48 AdQA prompts each), and
    the prompt is a third shorter. The row itself keeps the whole paragraph."""
    sentence = sentence_around(context["context"], int(context["answer_start"]))
    # EES: a new question for the answer the student missed, not the same words again.
    instruction = f'Write the question, worded differently from "{avoid}".' if avoid else "Write the question."
    ask = f'Sentence: "{sentence}"\nAnswer: "{context["answer"]}"\n{instruction}'
    return [*_FEW_SHOT, {"role": "user", "content": ask}]


_FEW_SHOT: tuple[Message, ...] = (
    {"role": "system",
     "content": "You turn a sentence into a question. The answer to the question is the given phrase."},
    {"role": "user", "content": 'Sentence: "The Hoppings funfair is held on the Town Moor every June."\n'
     'Answer: "June"\nWrite the question.'},
    {"role": "assistant", "content": "In which month is the Hoppings funfair held on the Town Moor?"},
    {"role": "user", "content": 'Sentence: "Marie Curie won the Nobel Prize in Chemistry in 1911 for '
     'discovering radium."\nAnswer: "Marie Curie"\nWrite the question.'},
    {"role": "assistant", "content": "Who won the Nobel Prize in Chemistry in 1911 for discovering radium?"},
)


def _system() -> Message:
    return {
        "role": "system",
        "content": "You write reading-comprehension questions about a paragraph. The answer to each "
        "question is a phrase copied from the paragraph.",
    }


_FORMAT = (
    "Reply in exactly two lines:\nAnswer: <a short phrase copied word for word from the paragraph>\n"
    "Question: <a question ending with '?' whose answer is that phrase>"
)
_LIST_MARK = re.compile(r"^\s*(?:\d+[.)]|[-*\u2022])\s+")
_CONTENT_WORD = re.compile(r"[a-z0-9]{4,}")
_NOT_TOPICAL = STOP_WORDS | {"many", "much", "name"}  # "What is the name of ..." says nothing of the topic


def _stems(text: str) -> set[str]:
    return {w[:5] for w in _CONTENT_WORD.findall(text.lower()) if w not in _NOT_TOPICAL}


@dataclass
class ExtractiveQATask(Task):
    """Rows: {"context", "question", "answer", "answer_start"}; the answer is a span of the context."""

    type: str = "extractive_qa"
    fields: tuple[str, ...] = ("context", "question", "answer")
    primary_metric: str = "f1"
    secondary_metric: str = "exact_match"
    gold_field: str = "answer"
    needs_labels: bool = False
    context_fields: tuple[str, ...] = ("context",)
    description: str = "paragraph"
    answers: str = "picked"  # who picks the seed answer span: "picked" (s3ray) | "teacher"

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

    def seed_context(self, row: dict, rng: random.Random) -> dict:
        """What a seed request keeps from a real row: its paragraph, plus a picked answer span.

        The real row's own question and answer are never passed on (they are validation data)."""
        kept = {"id": row.get("id"), "context": row["context"]}
        if self.answers == "picked":
            span = pick_span(row["context"], rng)
            if span is not None:  # a paragraph with no candidate falls back to the teacher's pick
                kept.update(answer=span.text, answer_start=span.start, answer_kind=span.kind)
        return kept

    # --- prompts -----------------------------------------------------------------------------
    def rationale_messages(self, label: str, k: int) -> list[Message]:
        raise NotImplementedError("extractive QA has no labels, so no rationales (as in the paper)")

    def seed_messages(
        self, label: str | None = None, rationales: list[str] | None = None, context: dict | None = None
    ) -> list[Message]:
        if not context or not context.get("context"):
            raise ValueError("extractive QA seed synthesis needs a real row with a 'context' paragraph")
        if context.get("answer"):
            return _question_for_answer(context)
        ask = (
            f'Here is a {self.description}:\n"{context["context"]}"\n\n'
            "Pick a short phrase from it (a name, number, date or few words) and write a question "
            f"that this phrase answers.\n{_FORMAT}"
        )
        return [_system(), {"role": "user", "content": ask}]

    def ees_messages(self, error_row: dict) -> list[Message]:
        return _question_for_answer(error_row, avoid=error_row["question"])

    # --- parsing -----------------------------------------------------------------------------
    def parse_example(self, text: str, label: str | None, context: dict | None) -> dict:
        """A question (and, when the teacher picked it, an answer span) from a reply; the answer given in
        `context` (picked span or EES gold answer) is kept as is."""
        if text is None or not text.strip():
            raise ParseError("empty")
        if not context or not context.get("context"):
            raise ValueError("parse_example needs the row whose context was kept")
        paragraph = context["context"]
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        if context.get("answer"):
            answer, start = context["answer"], int(context["answer_start"])
            question = _find_field(lines, _QUESTION)
            if question is None:  # the reply is the question itself, maybe after a lead-in line
                asked = [ln for ln in lines if "?" in ln]
                question = _strip(_LIST_MARK.sub("", asked[0])) if asked else None
            if question is None and _REFUSAL.search(text):
                raise ParseError("refusal")
            if not question:
                raise ParseError("not_a_question", lines[0][:80])
        else:
            answer = _find_field(lines, _ANSWER)
            question = _find_field(lines, _QUESTION)
            if answer is None and question is None and _REFUSAL.search(text):
                raise ParseError("refusal")
            if not answer:
                raise ParseError("no_answer", "expected a line 'Answer: ...'")
            if not question:
                raise ParseError("no_question", "expected a line 'Question: ...'")
            if _REFUSAL.search(answer):
                raise ParseError("refusal")
            if len(answer.split()) > MAX_ANSWER_WORDS:
                raise ParseError("answer_too_long", f"{len(answer.split())} words > {MAX_ANSWER_WORDS}")
            span = find_span(answer, paragraph)
            if span is None:
                raise ParseError("answer_not_in_context", answer[:80])
            answer, start = span
        if _REFUSAL.search(question):
            raise ParseError("refusal")
        if "?" not in question:
            raise ParseError("not_a_question", question[:80])
        question = question[: question.find("?") + 1].strip()  # one question; drop what follows it
        if len(question) < self.min_chars:
            raise ParseError("too_short", f"{len(question)} < {self.min_chars} chars")
        if len(question) > self.max_chars:
            raise ParseError("too_long", f"{len(question)} > {self.max_chars} chars")
        if normalize_answer(answer) and f" {normalize_answer(answer)} " in f" {normalize_answer(question)} ":
            raise ParseError("question_contains_answer")
        # A question sharing no content word (by 5-letter stem) with its paragraph is about something else.
        # Real adversarial questions avoid the paragraph's words too (about 1 in 8 would fail this check);
        # a small teacher's unrelated questions are the far commoner case.
        if not _stems(question) & _stems(paragraph):
            raise ParseError("off_topic", question[:80])
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

    def student_head(self):
        # torch and transformers load only when a student is built, not when a config is checked.
        from s3ray.student.heads import SpanHead

        return SpanHead(self)

    def check_student_rows(self, rows: list[dict], where: str) -> list[dict]:
        """Rows whose answer sits at answer_start in the context; others are repaired (first occurrence) or
        dropped, and the count is logged: a wrong offset would silently teach the wrong span."""
        if not rows:
            raise ValueError(f"{where}: no rows (the student needs at least one)")
        good, fixed, dropped = [], 0, 0
        for r in rows:
            ctx, ans = r.get("context") or "", r.get("answer") or ""
            start = r.get("answer_start")
            if not ans or not r.get("question"):
                dropped += 1
                continue
            if not isinstance(start, int) or ctx[start : start + len(ans)] != ans:
                found = ctx.find(ans)
                if found < 0:
                    dropped += 1
                    continue
                r = {**r, "answer_start": found}
                fixed += 1
            good.append(r)
        if fixed or dropped:
            log.warning(
                "%s: %d QA rows had a wrong answer_start (re-located), %d had no answer in the context "
                "(dropped)", where, fixed, dropped,
            )
        if not good:
            raise ValueError(f"{where}: no usable QA rows (each needs question, context, and an answer inside it)")
        return good

    def score_rows(self, predictions: list, golds: list) -> dict[str, list]:
        """`correct` is SQuAD exact match (a miss is a mined error), `f1` the token F1."""
        golds = [str(g) for g in golds]
        return {
            "correct": [bool(exact_match(p, g)) for p, g in zip(predictions, golds)],
            "f1": [token_f1(p, g) for p, g in zip(predictions, golds)],
        }

    def metric_stats(self, predictions: list, golds: list) -> dict[str, float]:
        scored = self.score_rows(predictions, golds)
        return {"n": len(golds), "em_sum": float(sum(scored["correct"])), "f1_sum": float(sum(scored["f1"]))}

    def metrics_from_stats(self, stats: dict[str, float]) -> dict[str, float]:
        n = int(stats.get("n", 0))
        if n == 0:
            return {"exact_match": float("nan"), "f1": float("nan"), "n": 0}
        return {"exact_match": stats["em_sum"] / n, "f1": stats["f1_sum"] / n, "n": n}

    @classmethod
    def row_columns(cls) -> list[pa.Field]:
        return [pa.field("answer_start", pa.int64())]

    @classmethod
    def from_config(cls, task_cfg, labels: list[str] | None, **kw) -> ExtractiveQATask:
        return cls(labels=None, answers=task_cfg.qa_answers, **kw)
