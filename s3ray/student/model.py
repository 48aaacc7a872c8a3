"""Student networks: any HF encoder with a classification or span head, or a linear head on frozen
mean-pooled embeddings (the fast `embedding_head` student)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput


def build_finetune_model(
    model_path: str, task_type: str, labels: list[str] | None, trust_remote_code: bool = False
):
    """A pretrained encoder with a fresh task head (classification/pair: labels; extractive_qa: spans)."""
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    if task_type == "extractive_qa":
        return AutoModelForQuestionAnswering.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    if not labels:
        raise ValueError(f"task type {task_type!r} needs label names (task.labels is empty)")
    return AutoModelForSequenceClassification.from_pretrained(
        model_path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={lab: i for i, lab in enumerate(labels)},
        ignore_mismatched_sizes=True,  # a base that already had a head with another label count
        trust_remote_code=trust_remote_code,
    )


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token vectors that are not padding (sentence-transformers' pooling for MiniLM)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class EmbeddingHeadModel(nn.Module):
    """Frozen encoder -> mean pooling -> linear head; returns logits like a HF classifier."""

    def __init__(self, encoder: nn.Module, head: nn.Linear):
        super().__init__()
        self.encoder = encoder
        self.head = head

    @torch.no_grad()
    def embed(self, **inputs) -> torch.Tensor:
        out = self.encoder(**inputs)
        return mean_pool(out.last_hidden_state, inputs["attention_mask"])

    def forward(self, **inputs) -> SequenceClassifierOutput:
        return SequenceClassifierOutput(logits=self.head(self.embed(**inputs)))
