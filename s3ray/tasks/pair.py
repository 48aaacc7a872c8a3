"""Sentence-pair classification (RTE, QNLI, MNLI-style NLI).

As in the paper, seed synthesis keeps a real first half (`text_a`: the premise, or QNLI's question) and asks
the teacher for the second half (`text_b`) with a given label; EES keeps the error row's `text_a` and asks for
a new `text_b` like the misclassified one, with the gold label. No rationales by default.

Prompt wording. `task.description` names `text_a` in the teacher's words ("premise", "news premise",
"question"); `task.label_descriptions[label]` is the noun phrase for what to write, e.g.
{entailment: "a sentence that must be true if the premise is true"}. When a label has no description, a
default is used for the common NLI labels, worded for questions when the description mentions "question"
(QNLI: entailment = "a sentence that answers the question"), else for premises (RTE/MNLI).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from s3ray.tasks.base import ParseError, Task, clean_generation
from s3ray.teacher.types import Message

# label -> what to write, with {d} = task.description (the name of text_a).
_PREMISE_DEFAULTS = {
    "entailment": "a sentence that must be true if the {d} is true",
    "not_entailment": "a sentence on the same topic that might be false, or is not implied, given the {d}",
    "contradiction": "a sentence that cannot be true if the {d} is true",
    "neutral": "a sentence on the same topic that might be true or false given the {d}",
}
_QUESTION_DEFAULTS = {
    "entailment": "a sentence that contains the answer to the {d}",
    "not_entailment": "a sentence on the same topic that does not answer the {d}",
}
_SECOND_LINE = re.compile(
    r"^\W*(?:hypothesis|sentence|answer|statement)\s*(?:\d+)?\s*[:\-]\s*(.+)$", re.IGNORECASE
)
_WORD = re.compile(r"[a-z0-9]+")


def _tokens(s: str) -> set[str]:
    return set(_WORD.findall(s.lower()))


def near_copy(a: str, b: str, threshold: float = 0.9) -> bool:
    """True when b is (almost) a word-for-word copy of a: same word set (Jaccard >= threshold) or b holds
    the whole of a. A short hypothesis that is a *part* of the premise is legitimate NLI data."""
    ta, tb = _tokens(a), _tokens(b)
    if not ta or not tb:
        return False
    if ta <= tb:
        return True
    return len(ta & tb) / len(ta | tb) >= threshold


@dataclass
class PairTask(Task):
    """Rows: {"text_a", "text_b", "label"}; the student reads (text_a, text_b) as a pair."""

    type: str = "pair"
    fields: tuple[str, ...] = ("text_a", "text_b")
    context_fields: tuple[str, ...] = ("text_a",)
    description: str = "premise"

    def label_words(self, label: str) -> str:
        """What the teacher is asked to write for `label` (config first, then NLI defaults)."""
        if label in self.label_descriptions:
            return self.label_descriptions[label]
        defaults = _QUESTION_DEFAULTS if "question" in self.description.lower() else _PREMISE_DEFAULTS
        template = defaults.get(label, "a sentence that has a '{label}' relation to the {d}")
        return template.format(d=self.description, label=label)

    def _system(self) -> Message:
        return {
            "role": "system",
            "content": f"You write sentences that go with a given {self.description}, for a sentence-pair dataset.",
        }

    # --- prompts -----------------------------------------------------------------------------
    def rationale_messages(self, label: str, k: int) -> list[Message]:
        # Only used when synthesis.use_rationales is forced on (the paper skips them for pairs).
        return [
            self._system(),
            {
                "role": "user",
                "content": f"List {k} different ways to write {self.label_words(label)}. "
                f"Write one short way per line, numbered 1 to {k}.",
            },
        ]

    def seed_messages(
        self, label: str | None, rationales: list[str] | None = None, context: dict | None = None
    ) -> list[Message]:
        if not context or not context.get("text_a"):
            raise ValueError("pair seed synthesis needs a real row with 'text_a' (the kept first half)")
        if label is None:
            raise ValueError("pair seed synthesis needs a label")
        words = self.label_words(label)
        ask = f'Here is a {self.description}:\n"{context["text_a"]}"\n\nWrite {words}.'
        if rationales:
            ask += " For example: " + "; ".join(rationales) + "."
        ask += " Reply with only that one sentence."
        return [self._system(), {"role": "user", "content": ask}]

    def ees_messages(self, error_row: dict) -> list[Message]:
        words = self.label_words(error_row["label"])
        ask = (
            f'Here is a {self.description}:\n"{error_row["text_a"]}"\n\n'
            f'Here is {words}:\n"{error_row["text_b"]}"\n\n'
            f"Write a new, different sentence that is similar to it and is also {words}. "
            "Reply with only that one sentence."
        )
        return [self._system(), {"role": "user", "content": ask}]

    # --- parsing -----------------------------------------------------------------------------
    def parse_example(self, text: str, label: str | None, context: dict | None) -> dict:
        if not context or not context.get("text_a"):
            raise ValueError("parse_example needs the row whose text_a was kept")
        text_a = context["text_a"]
        if text and text.strip():
            # A reply that restates the pair ("Premise: ...\nHypothesis: ...") — keep the second half.
            for line in text.strip().splitlines():
                m = _SECOND_LINE.match(line)
                if m:
                    text = m.group(1)
                    break
        t = clean_generation(text, self.min_chars, self.max_chars)
        low = t.lower()
        if low.startswith(("write ", "list ", "reply with", "here is a")):
            raise ParseError("echoed_instruction")
        if near_copy(text_a, t):
            raise ParseError("copies_premise")
        if text_a.rstrip().endswith("?") and t.endswith("?"):
            # QNLI: text_b must be a statement, not another question.
            raise ParseError("wrote_a_question")
        return {"text_a": text_a, "text_b": t, "label": label}

    # --- student ------------------------------------------------------------------------------
    def student_inputs(self, row: dict) -> tuple[str, str | None]:
        return row["text_a"], row["text_b"]
