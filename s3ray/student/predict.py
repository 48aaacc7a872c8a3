"""Student inference: one code path for validation during training, `evaluate_student`, and the Ray Data
error mining (`StudentPredictor` is a callable class for `map_batches`, and works in plain loops too).
The batched forward passes for the two built-in heads (class probabilities, QA spans) live here too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

from s3ray.student.checkpoint import HEAD_FILE, read_meta
from s3ray.student.features import MAX_ANSWER_TOKENS, encode_qa, encode_texts
from s3ray.student.model import EmbeddingHeadModel
from s3ray.tasks import task_for_checkpoint


def _to(batch, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def classify_probs(
    model,
    tokenizer,
    texts_a: list[str],
    texts_b: list[str | None] | None,
    max_length: int,
    batch_size: int,
    device,
    progress: bool = False,
) -> np.ndarray:
    """Class probabilities (n x labels), one forward pass per `batch_size` rows. Rows are sorted by length
    first so batches pad little; the output is in input order."""
    n = len(texts_a)
    lengths = [len(a) + len(texts_b[i] or "") if texts_b else len(a) for i, a in enumerate(texts_a)]
    order = np.argsort(lengths, kind="stable")
    out = np.zeros((n, 0), dtype=np.float32)
    chunks = []
    for s in tqdm(range(0, n, batch_size), disable=not progress, desc="predict", leave=False):
        idx = order[s : s + batch_size]
        enc = encode_texts(
            tokenizer,
            [texts_a[i] for i in idx],
            [texts_b[i] for i in idx] if texts_b else None,
            max_length,
            padding=True,
            return_tensors="pt",
        )
        logits = model(**_to(enc, device)).logits.float()
        chunks.append(torch.softmax(logits, -1).cpu().numpy())
    if chunks:
        out = np.empty((n, chunks[0].shape[1]), dtype=np.float32)
        out[order] = np.concatenate(chunks)
    return out


@torch.no_grad()
def qa_predict(
    model,
    tokenizer,
    questions: list[str],
    contexts: list[str],
    max_length: int,
    batch_size: int,
    device,
    progress: bool = False,
) -> tuple[list[str], np.ndarray]:
    """Best answer span per row (text cut from the context by offsets) and its probability
    p_start * p_end. One forward pass per `batch_size` rows, whatever the number of context windows, so
    every data-parallel rank runs the same number of passes (ZeRO-3 needs that)."""
    answers: list[str] = []
    margins: list[float] = []
    for s in tqdm(range(0, len(questions), batch_size), disable=not progress, desc="predict", leave=False):
        qs, cs = questions[s : s + batch_size], contexts[s : s + batch_size]
        enc = encode_qa(tokenizer, qs, cs, max_length, padding=True, return_tensors="pt")
        sample_map = enc.pop("overflow_to_sample_mapping").tolist()
        offsets = enc.pop("offset_mapping").tolist()
        n_feat, length = enc["input_ids"].shape
        in_context = torch.tensor(
            [[sid == 1 for sid in enc.sequence_ids(f)] for f in range(n_feat)], dtype=torch.bool
        )
        out = model(**_to(enc, device))
        start, end = out.start_logits.float().cpu(), out.end_logits.float().cpu()
        pad = enc["attention_mask"] == 0
        p_start = torch.softmax(start.masked_fill(pad, -1e9), -1)
        p_end = torch.softmax(end.masked_fill(pad, -1e9), -1)
        # Span scores for every (start, end) with start <= end < start + MAX_ANSWER_TOKENS, both in context.
        scores = start[:, :, None] + end[:, None, :]
        ones = torch.ones(length, length, dtype=torch.bool)
        band = torch.triu(ones) & ~torch.triu(ones, diagonal=MAX_ANSWER_TOKENS)
        valid = band[None] & in_context[:, :, None] & in_context[:, None, :]
        scores = scores.masked_fill(~valid, float("-inf"))
        best, flat = scores.view(n_feat, -1).max(-1)
        best_per_row = [(float("-inf"), -1)] * len(qs)
        for f in range(n_feat):
            r = sample_map[f]
            if best[f] > best_per_row[r][0]:
                best_per_row[r] = (float(best[f]), f)
        for r, (score, f) in enumerate(best_per_row):
            if f < 0 or not np.isfinite(score):
                answers.append("")
                margins.append(0.0)
                continue
            si, ei = divmod(int(flat[f]), length)
            answers.append(cs[r][offsets[f][si][0] : offsets[f][ei][1]])
            margins.append(float(p_start[f, si] * p_end[f, ei]))
    return answers, np.asarray(margins, dtype=np.float32)


def top2_margin(probs: np.ndarray) -> np.ndarray:
    """p(top1) - p(top2): small means the student was unsure."""
    if probs.shape[1] < 2:
        return np.ones(len(probs), dtype=np.float32)
    part = np.sort(probs, axis=1)
    return (part[:, -1] - part[:, -2]).astype(np.float32)


def load_student(checkpoint: str | Path, device: str | torch.device, task=None):
    """(model in eval mode on `device`, tokenizer, meta, task) from a student checkpoint folder. `task`
    defaults to the registered family named in the checkpoint, with its labels."""
    meta = read_meta(checkpoint)
    if task is None:
        task = task_for_checkpoint(meta["task_type"], meta["labels"])
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    if meta["kind"] == "embedding_head":
        encoder = AutoModel.from_pretrained(str(checkpoint))
        state = load_file(str(Path(checkpoint) / HEAD_FILE))
        head = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
        head.load_state_dict(state)
        model = EmbeddingHeadModel(encoder, head)
    else:
        model = task.student_head().build(str(checkpoint))
    return model.to(device).eval(), tokenizer, meta, task


def _column(values) -> np.ndarray:
    """Strings as an object column (Arrow strings in Ray Data), numbers as a numeric one."""
    values = list(values)
    return np.asarray(values, dtype=object if values and isinstance(values[0], str) else None)


class StudentPredictor:
    """Callable for `ray.data.Dataset.map_batches(StudentPredictor, fn_constructor_kwargs=...)` or plain use.

    Returns the input columns plus `prediction` and `margin` (small: the student was unsure) from the task's
    student head, and, when the task's gold column is present, the task's `score_rows` columns: `correct`
    (False marks a mined error) and any others (QA: `f1`). `task` defaults to the checkpoint's family.
    """

    def __init__(self, checkpoint: str, batch_size: int = 64, device: str | None = None, task=None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        from s3ray.models import loaded_from

        # A checkpoint in object storage: a fresh copy for this actor, deleted once loaded.
        with loaded_from(str(checkpoint)) as local:
            self.model, self.tokenizer, self.meta, self.task = load_student(local, self.device, task)
        self.head = self.task.student_head()
        self.batch_size = batch_size
        self.max_length = int(self.meta["max_length"])

    def predict_rows(self, rows: list[dict], progress: bool = False) -> tuple[list, np.ndarray]:
        """(predictions, margins) for row dicts."""
        return self.head.predict(
            self.model, self.tokenizer, rows, self.max_length, self.batch_size, self.device, progress
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cols = list(batch)
        n = len(batch[cols[0]]) if cols else 0
        rows = [{c: batch[c][i] for c in cols} for i in range(n)]
        preds, margins = self.predict_rows(rows)
        out = dict(batch)
        out["prediction"] = _column(preds)
        out["margin"] = np.asarray(margins, dtype=np.float32)
        gold = self.task.gold_field
        if gold in batch:
            for name, values in self.task.score_rows(preds, list(batch[gold])).items():
                out[name] = _column(values)
        return out
