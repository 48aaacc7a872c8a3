"""Student heads: which model a task family trains, how its rows become features, and how the model's
outputs become predictions. A `Task.student_head()` returns one of these (or its own: any object with the
same four members works, see `StudentHead`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

from s3ray.student.features import encode_texts, qa_train_features
from s3ray.student.predict import classify_probs, qa_predict, top2_margin


class StudentHead(Protocol):
    supports_embedding_head: bool  # whether the frozen-embedding student (linear head on labels) fits

    def build(self, model_path: str, trust_remote_code: bool = False) -> torch.nn.Module: ...

    def features(self, tokenizer, rows: list[dict], max_length: int) -> list[dict]: ...

    def predict(
        self, model, tokenizer, rows: list[dict], max_length: int, batch_size: int, device, progress: bool = False
    ) -> tuple[list, np.ndarray]: ...


def split_inputs(task, rows: list[dict]) -> tuple[list[str], list[str | None] | None]:
    """`task.student_inputs` of each row as (first texts, second texts or None for single texts)."""
    inputs = [task.student_inputs(r) for r in rows]
    texts_b = [b for _, b in inputs]
    return [a for a, _ in inputs], None if all(b is None for b in texts_b) else texts_b


@dataclass
class LabelHead:
    """A sequence classifier over `task.student_inputs` (one text or a text pair), one output per label."""

    task: object
    supports_embedding_head: bool = True

    @property
    def labels(self) -> list[str]:
        if not self.task.labels:
            raise ValueError(f"task type {self.task.type!r} needs label names (task.labels is empty)")
        return list(self.task.labels)

    def build(self, model_path: str, trust_remote_code: bool = False) -> torch.nn.Module:
        labels = self.labels
        return AutoModelForSequenceClassification.from_pretrained(
            model_path,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={lab: i for i, lab in enumerate(labels)},
            ignore_mismatched_sizes=True,  # a base that already had a head with another label count
            trust_remote_code=trust_remote_code,
        )

    def targets(self, rows: list[dict]) -> list[int]:
        label2id = {lab: i for i, lab in enumerate(self.labels)}
        return [label2id[r[self.task.gold_field]] for r in rows]

    def features(self, tokenizer, rows: list[dict], max_length: int) -> list[dict]:
        texts_a, texts_b = split_inputs(self.task, rows)
        enc = encode_texts(tokenizer, texts_a, texts_b, max_length)
        return [{**{k: enc[k][i] for k in enc}, "labels": y} for i, y in enumerate(self.targets(rows))]

    def decode(self, probs: np.ndarray) -> tuple[list[str], np.ndarray]:
        """Label names and top-2 margins from class probabilities."""
        labels = self.labels
        return [labels[i] for i in probs.argmax(1)], top2_margin(probs)

    def predict(self, model, tokenizer, rows, max_length, batch_size, device, progress=False):
        texts_a, texts_b = split_inputs(self.task, rows)
        probs = classify_probs(model, tokenizer, texts_a, texts_b, max_length, batch_size, device, progress)
        return self.decode(probs)


@dataclass
class SpanHead:
    """Extractive QA: start/end logits over (question, context) windows; the prediction is a span of the
    context and its margin p_start * p_end."""

    task: object
    supports_embedding_head: bool = False

    def build(self, model_path: str, trust_remote_code: bool = False) -> torch.nn.Module:
        return AutoModelForQuestionAnswering.from_pretrained(model_path, trust_remote_code=trust_remote_code)

    def features(self, tokenizer, rows: list[dict], max_length: int) -> list[dict]:
        return qa_train_features(tokenizer, rows, max_length)

    def predict(self, model, tokenizer, rows, max_length, batch_size, device, progress=False):
        questions, contexts = split_inputs(self.task, rows)
        return qa_predict(model, tokenizer, questions, contexts, max_length, batch_size, device, progress)
