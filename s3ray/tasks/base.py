"""What a task is to s3ray: its fields, its prompts, its output parser and its metric.

Each task family (classification, pair, extractive QA) is one small class. The S3 loop only calls the
methods below, so adding a family means writing one file, not touching the loop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from s3ray.teacher.types import Message


class ParseError(Exception):
    """Teacher output that can't be used. `reason` is a short code counted in the report."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


_LEAD_IN = re.compile(r"^\s*(?:sure|okay|ok|certainly)?[,!.]?\s*(?:here(?:'s| is| are)\b[^:\n]*:)\s*", re.IGNORECASE)
_LABEL = re.compile(
    r"^\s*(?:\*\*)?(?:new\s+)?(?:movie\s+)?(?:review|sentence|example|text|answer|output|hypothesis|question)"
    r"\s*(?:\d+)?\s*[:\-](?:\*\*)?\s*",
    re.IGNORECASE,
)
_QUOTED = re.compile(r'^\s*["“]([^"“”]{2,})["”]')
# 'One negative review that is too intense is: "The movie ..."' -> the quoted example.
_INTRO_QUOTED = re.compile(r'^[^"“\n]{0,100}:\s*["“]([^"“”]{2,})["”]?')
_REFUSAL = re.compile(r"\b(?:as an ai|i cannot|i can't|i'm sorry|i am sorry|language model)\b", re.IGNORECASE)
_LIST_ITEM = re.compile(r"^\s*(?:\d+[.)]|[-*\u2022])\s+(.*\S)\s*$")


def missing_text_field(row: dict, fields) -> str | None:
    """What is wrong when one of `fields` is not a non-empty string, else None."""
    for f in fields:
        v = row.get(f)
        if not isinstance(v, str) or not v.strip():
            return f"field {f!r} is missing or empty"
    return None


def clean_generation(text: str, min_chars: int, max_chars: int) -> str:
    """The first usable paragraph of a teacher reply, with chat boilerplate and quotes removed."""
    if text is None or not text.strip():
        raise ParseError("empty")
    t = text.strip()
    t = _LEAD_IN.sub("", t, count=1).strip()  # "Sure, here is a new review:"
    t = _LABEL.sub("", t, count=1).strip()  # "Review:"
    quoted = _QUOTED.match(t) or _INTRO_QUOTED.match(t)
    if quoted:  # '"the example" -- and then commentary about it'
        t = quoted.group(1)
    # A reply often continues with commentary or a second example after a blank line.
    t = re.split(r"\n\s*\n", t, maxsplit=1)[0].strip()
    t = t.strip().strip('"“”\'`').strip()
    if _REFUSAL.search(t):
        raise ParseError("refusal")
    if len(t) < min_chars:
        raise ParseError("too_short", f"{len(t)} < {min_chars} chars")
    if len(t) > max_chars:
        raise ParseError("too_long", f"{len(t)} > {max_chars} chars")
    if not re.search(r"[A-Za-z]{2,}", t):
        raise ParseError("no_words")
    return t


def parse_list(text: str, expected: int) -> list[str]:
    """Numbered or bulleted lines from a teacher reply (rationale lists)."""
    if text is None or not text.strip():
        raise ParseError("empty")
    items = []
    for line in text.splitlines():
        m = _LIST_ITEM.match(line)
        if m:
            item = m.group(1).strip().strip("*").strip()
            if len(item) >= 4 and item.lower() not in (i.lower() for i in items):
                items.append(item)
    if not items:
        raise ParseError("no_list_items")
    return items[:expected]


@dataclass
class Task:
    """Base for the task families. Rows are plain dicts with the family's `fields` plus `label`."""

    labels: list[str] | None
    description: str = "example"
    label_descriptions: dict[str, str] = field(default_factory=dict)
    min_chars: int = 8
    max_chars: int = 1200

    type: str = "base"
    fields: tuple[str, ...] = ()
    primary_metric: str = "accuracy"
    # The part a seed prompt keeps from a real row (pair: text_a; QA: context). Empty: none.
    context_fields: tuple[str, ...] = ()

    def label_words(self, label: str) -> str:
        return self.label_descriptions.get(label, label)

    # --- data ---------------------------------------------------------------------------------
    def validate_row(self, row: dict) -> str | None:
        """None when the row fits the task, else what is wrong with it."""
        problem = missing_text_field(row, self.fields)
        if problem:
            return problem
        if self.labels is not None and row.get("label") not in self.labels:
            return f"label {row.get('label')!r} is not one of {self.labels}"
        return None

    def seed_context(self, row: dict, rng) -> dict:
        """What a seed request keeps from a real context row (QA adds a picked answer span)."""
        return row

    # --- prompts ------------------------------------------------------------------------------
    def rationale_messages(self, label: str, k: int) -> list[Message]:
        raise NotImplementedError

    def seed_messages(self, label: str | None, rationales: list[str], context: dict | None) -> list[Message]:
        raise NotImplementedError

    def ees_messages(self, error_row: dict) -> list[Message]:
        raise NotImplementedError

    # --- parsing ------------------------------------------------------------------------------
    def parse_rationales(self, text: str, k: int) -> list[str]:
        return parse_list(text, k)

    def parse_example(self, text: str, label: str | None, context: dict | None) -> dict:
        """The new row's task fields and label; raises ParseError with a countable reason."""
        raise NotImplementedError

    def dedup_text(self, row: dict) -> str:
        """What two rows must share to be duplicates (the generated part, not the kept context)."""
        return " ".join(str(row[f]) for f in self.fields if f not in self.context_fields)

    # --- student and metric -------------------------------------------------------------------
    def student_inputs(self, row: dict) -> tuple[str, str | None]:
        raise NotImplementedError

    def metrics(self, predictions: list, golds: list) -> dict[str, float]:
        raise NotImplementedError


def accuracy_and_macro_f1(predictions: list, golds: list, labels: list[str]) -> dict[str, float]:
    n = len(golds)
    if n == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "n": 0}
    correct = sum(p == g for p, g in zip(predictions, golds))
    f1s = []
    for lab in labels:
        tp = sum(p == lab and g == lab for p, g in zip(predictions, golds))
        fp = sum(p == lab and g != lab for p, g in zip(predictions, golds))
        fn = sum(p != lab and g == lab for p, g in zip(predictions, golds))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": correct / n, "macro_f1": sum(f1s) / len(f1s), "n": n}
