"""Annotation mode: the fine-tuned teacher labels an unlabelled pool.

For every row and every label, the teacher scores the label's completion (the label word and the turn's end
marker, exactly as trained) after the annotation prompt; the row's label is the argmax of those summed
log-probabilities and its confidence the softmax over them. Rows at or above `threshold` are kept. Where
the pool has gold labels the report gives agreement with them, overall and among the kept rows, and the
coverage at the threshold. Scoring uses transformers in this process (a teacher-forced forward pass per
row x label); vLLM's prompt log-probs would do the same on a served teacher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from s3ray.finetune.formats import annotation_messages, completion_ids, prompt_ids
from s3ray.tasks.base import Task


@dataclass
class Annotation:
    label: str
    confidence: float  # softmax over the labels' completion log-probabilities
    logprobs: dict  # label -> summed log-probability of its completion


def _score(model, batch: list[tuple[list[int], list[int]]], pad_id: int) -> list[float]:
    """Summed log-probability of each completion after its prompt (one padded forward pass)."""
    import torch

    width = max(len(p) + len(c) for p, c in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, c) in enumerate(batch):
        seq = p + c
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    with torch.no_grad():
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
    out = []
    for i, (p, c) in enumerate(batch):
        pos = torch.arange(len(p) - 1, len(p) + len(c) - 1)  # the logits that predict each completion token
        out.append(float(logp[i, pos, torch.tensor(c)].sum()))
    return out


def annotate_rows(model, tokenizer, task: Task, rows: list[dict], batch_size: int = 16) -> list[Annotation]:
    """The teacher's label for every row (rows need the task's input fields, not a label)."""
    if not task.labels:
        raise ValueError(f"annotation needs labels; task type {task.type!r} has none (use mode=generate)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    jobs = []  # (row index, label, prompt ids, completion ids)
    for i, row in enumerate(rows):
        msgs = annotation_messages(task, row)
        p = prompt_ids(tokenizer, msgs)
        jobs += [(i, lab, p, completion_ids(tokenizer, msgs, lab)) for lab in task.labels]
    scores: list[dict] = [{} for _ in rows]
    for k in range(0, len(jobs), batch_size):
        chunk = jobs[k : k + batch_size]
        for (i, lab, _, _), s in zip(chunk, _score(model, [(p, c) for _, _, p, c in chunk], pad)):
            scores[i][lab] = s
    out = []
    for lp in scores:
        top = max(lp.values())
        z = sum(math.exp(v - top) for v in lp.values())
        best = max(lp, key=lp.get)
        out.append(Annotation(best, 1.0 / z, lp))  # exp(top - top) / z
    return out


def annotation_report(task: Task, rows: list[dict], anns: list[Annotation], threshold: float) -> dict:
    """Coverage at the threshold, and agreement with gold labels where the pool has them."""
    kept = [a.confidence >= threshold for a in anns]
    gold = [(r.get("label"), a.label, k) for r, a, k in zip(rows, anns, kept) if r.get("label") in (task.labels or [])]
    rep = {"n": len(rows), "threshold": threshold, "kept": sum(kept),
           "coverage": sum(kept) / len(rows) if rows else float("nan"), "n_gold": len(gold),
           "predicted": {lab: sum(a.label == lab for a in anns) for lab in task.labels or []}}
    if gold:
        rep["agreement"] = sum(g == p for g, p, _ in gold) / len(gold)
        kept_gold = [(g, p) for g, p, k in gold if k]
        rep["agreement_kept"] = sum(g == p for g, p in kept_gold) / len(kept_gold) if kept_gold else float("nan")
    return rep


def annotated_rows(task: Task, rows: list[dict], anns: list[Annotation], threshold: float) -> list[dict]:
    """The pool rows with the teacher's label (kept rows only), its confidence, and the gold label if any."""
    out = []
    for r, a in zip(rows, anns):
        if a.confidence >= threshold:
            row = {f: r[f] for f in task.fields}
            out.append({**row, "label": a.label, "confidence": a.confidence, "gold_label": r.get("label")})
    return out


def load_teacher(folder: str):
    """The exported teacher for scoring: bf16 on a GPU; fp32 on a CPU, where it is the fast path anyway."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from s3ray.finetune.export import is_adapter

    if is_adapter(folder):
        raise ValueError(f"{folder} is a LoRA adapter; annotate with lora.export=merged")
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    gpu = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16 if gpu else torch.float32,
                                                 trust_remote_code=False).eval()
    return (model.to("cuda") if gpu else model), tok
