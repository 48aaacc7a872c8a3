"""What a task is to s3ray: its fields, its prompts, its output parser, its metric and its student.

Each task family (classification, pair, extractive QA) is one small class. The S3 loop, the student and
the error mining only call the methods below, so adding a family means writing one file (and calling
`s3ray.tasks.register_task`), not touching the loop. What a family decides:
- data: `fields`, `gold_field` (what the student predicts), `needs_labels`, `validate_row`,
  `check_student_rows`, `row_columns` (typed columns of a synthetic row besides the text fields);
- metric: `metric_stats` (additive sufficient statistics, so Ray Data blocks can be summed) and
  `metrics_from_stats`; `metrics` is the two together; `primary_metric` picks the best epoch and
  `secondary_metric` is reported beside it;
- student: `student_head()` (which model the student is, how rows become features, how outputs become
  predictions) and `score_rows` (how predictions compare with gold; `correct` false = a mined error).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

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
    secondary_metric: str = "macro_f1"
    gold_field: str = "label"  # the row field the student predicts
    needs_labels: bool = True  # label names come from task.labels or the dataset card
    rationales_by_default: bool = False  # the paper writes rationales for single-text tasks only
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

    def student_head(self):
        """The student's model family for this task: an object with `build(model_path, trust_remote_code)`,
        `features(tokenizer, rows, max_length)`, `predict(model, tokenizer, rows, max_length, batch_size,
        device, progress)` -> (predictions, margins), and `supports_embedding_head` (see student/heads.py).
        Label tasks: a sequence classifier over `student_inputs`."""
        # torch and transformers load only when a student is built, not when a config is checked.
        from s3ray.student.heads import LabelHead

        return LabelHead(self)

    def check_student_rows(self, rows: list[dict], where: str) -> list[dict]:
        """The rows the student may train or validate on, or one error naming the first bad row."""
        if not rows:
            raise ValueError(f"{where}: no rows (the student needs at least one)")
        bad = [(r.get("id", i), p) for i, r in enumerate(rows) if (p := self.validate_row(r))]
        if bad:
            raise ValueError(
                f"{where}: {len(bad)} of {len(rows)} rows don't fit the {self.type} task, "
                f"e.g. row {bad[0][0]}: {bad[0][1]}"
            )
        return rows

    def golds(self, rows: list[dict]) -> list:
        return [r[self.gold_field] for r in rows]

    def score_rows(self, predictions: list, golds: list) -> dict[str, list]:
        """Per-row columns the predictor adds when gold is known; `correct` False marks a student error."""
        return {"correct": [str(p) == str(g) for p, g in zip(predictions, golds)]}

    def metric_stats(self, predictions: list, golds: list) -> dict[str, float]:
        """Additive statistics of the metric (label tasks: a gold x prediction count table)."""
        return dict(Counter(f"{g}{_SEP}{p}" for p, g in zip(predictions, golds)))

    def metrics_from_stats(self, stats: dict[str, float]) -> dict[str, float]:
        return macro_f1_from_counts(
            {tuple(k.split(_SEP, 1)): int(c) for k, c in stats.items()}, self.labels
        )

    def metrics(self, predictions: list, golds: list) -> dict[str, float]:
        return self.metrics_from_stats(self.metric_stats(predictions, golds))

    def score(self, metrics: dict) -> float:
        """The primary metric's value (higher is better), or a clear error when metrics lack it."""
        if self.primary_metric not in metrics:
            raise KeyError(
                f"task.metrics returned {sorted(metrics)}, without the primary metric {self.primary_metric!r}"
            )
        return float(metrics[self.primary_metric])

    @classmethod
    def row_columns(cls) -> list[pa.Field]:
        """Typed columns of a synthetic row besides the string `fields` (label tasks: the label)."""
        return [pa.field("label", pa.string())]

    @classmethod
    def from_config(cls, task_cfg, labels: list[str] | None, **kw) -> Task:
        """The task for a run config's `task` section (families with options of their own override this)."""
        return cls(labels=labels, **kw)


def merge_stats(parts) -> dict[str, float]:
    """Sum of `metric_stats` dicts (one per Ray Data block)."""
    total: Counter = Counter()
    for p in parts:
        total.update(p)
    return dict(total)


_SEP = "\x1f"  # joins gold and prediction into one count key; never part of a label name


def macro_f1_from_counts(counts: dict[tuple[str, str], int], labels: list[str] | None) -> dict[str, float]:
    """Accuracy and macro F1 from a (gold, prediction) -> count table: the one macro-F1 formula."""
    n = sum(counts.values())
    if n == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "n": 0}
    labels = list(labels) if labels else sorted({g for g, _ in counts})
    correct = sum(c for (g, p), c in counts.items() if g == p)
    f1s = []
    for lab in labels:
        tp = counts.get((lab, lab), 0)
        fp = sum(c for (g, p), c in counts.items() if p == lab and g != lab)
        fn = sum(c for (g, p), c in counts.items() if g == lab and p != lab)
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": correct / n, "macro_f1": sum(f1s) / len(f1s), "n": n}


def accuracy_and_macro_f1(predictions: list, golds: list, labels: list[str]) -> dict[str, float]:
    counts = Counter((str(g), str(p)) for p, g in zip(predictions, golds))
    return macro_f1_from_counts(dict(counts), labels)
