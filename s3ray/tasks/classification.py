"""Single-text classification (SST-2, IMDb, any number of labels)."""

from __future__ import annotations

from dataclasses import dataclass

from s3ray.tasks.base import ParseError, Task, clean_generation
from s3ray.teacher.types import Message


def _system(description: str) -> Message:
    return {"role": "system", "content": f"You write realistic {description} examples for a dataset."}


@dataclass
class ClassificationTask(Task):
    type: str = "classification"
    fields: tuple[str, ...] = ("text",)
    rationales_by_default: bool = True

    def rationale_messages(self, label: str, k: int) -> list[Message]:
        return [
            _system(self.description),
            {
                "role": "user",
                "content": f"List {k} different reasons why a {self.description} could be "
                f"{self.label_words(label)}. Write one short reason per line, numbered 1 to {k}.",
            },
        ]

    def seed_messages(self, label: str | None, rationales: list[str], context: dict | None) -> list[Message]:
        ask = f"Write one {self.label_words(label)} {self.description}."
        if rationales:
            ask += " It is " + self.label_words(label) + " because: " + "; ".join(rationales) + "."
        ask += f" Reply with only the {self.description}, in one to three sentences."
        return [_system(self.description), {"role": "user", "content": ask}]

    def ees_messages(self, error_row: dict) -> list[Message]:
        gold = self.label_words(error_row["label"])
        return [
            _system(self.description),
            {
                "role": "user",
                "content": f'Here is a {gold} {self.description}: "{error_row["text"]}"\n'
                f"Write a new {self.description} that is similar to it and is also {gold}. "
                f"Reply with only the new {self.description}.",
            },
        ]

    def parse_example(self, text: str, label: str | None, context: dict | None) -> dict:
        t = clean_generation(text, self.min_chars, self.max_chars)
        low = t.lower()
        # The teacher restating the instruction instead of writing an example.
        if low.startswith(("write ", "list ", "reply with")):
            raise ParseError("echoed_instruction")
        return {"text": t, "label": label}

    def student_inputs(self, row: dict) -> tuple[str, str | None]:
        return row["text"], None
