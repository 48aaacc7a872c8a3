"""The fast `embedding_head` student network: a linear head on frozen mean-pooled embeddings. (Fine-tuned
students are plain HF models; which one a task trains is its `student_head()`, see heads.py.)"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput


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
