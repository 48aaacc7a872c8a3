"""Annotation mode: the fine-tuned teacher labels an unlabelled pool.

For every row and every label, the teacher scores the label's completion (the label word and the turn's end
marker, exactly as trained) after the annotation prompt; the row's label is the argmax of those summed
log-probabilities and its confidence the softmax over them. Rows at or above `threshold` are kept. Where
the pool has gold labels the report gives agreement with them, overall and among the kept rows, and the
coverage at the threshold. Scoring is a teacher-forced transformers forward pass per row, its KV cache reused
for every label; the recipe runs it in `serve.replicas` Ray actors (`Scorer`), each on its GPUs or CPU threads,
so the driver never loads the teacher.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from s3ray.finetune.formats import annotation_messages, completion_ids, prompt_ids
from s3ray.tasks.base import Task


@dataclass
class Annotation:
    label: str
    confidence: float  # softmax over the labels' completion log-probabilities
    logprobs: dict  # label -> summed log-probability of its completion


def left_padded(prompts: list[list[int]], pad_id: int):
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def score_batch(model, prompts: list[list[int]], completions: list[list[list[int]]], pad_id: int) -> list[list[float]]:
    """Summed log-probability of every completion after its prompt: out[i][j] for prompt i, completion j.

    Each prompt runs once (left-padded, KV cache kept); each completion then runs on a copy of that cache,
    and only the positions that predict completion tokens reach the LM head. The same numbers as scoring
    every prompt+completion sequence whole, at about 1/len(labels) of the cost (the prompt dominates)."""
    import copy

    import torch

    ids, mask = left_padded(prompts, pad_id)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    dev = model.device
    out = [[0.0] * len(c) for c in completions]
    with torch.no_grad():
        first = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                      use_cache=True, logits_to_keep=1)
        first_logp = torch.log_softmax(first.logits[:, -1].float(), dim=-1).cpu()
        start = mask.sum(-1)  # the next position id of every row
        for j in range(max(len(c) for c in completions)):
            comps = [c[j] if j < len(c) else [] for c in completions]
            width = max(len(c) for c in comps)
            cids = torch.full((len(comps), width), pad_id, dtype=torch.long)
            cmask = torch.zeros_like(cids)
            for i, c in enumerate(comps):
                cids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
                cmask[i, : len(c)] = 1
            cpos = start[:, None] + torch.arange(width)[None, :]
            res = model(input_ids=cids.to(dev), attention_mask=torch.cat([mask, cmask], -1).to(dev),
                        position_ids=cpos.to(dev), past_key_values=copy.deepcopy(first.past_key_values),
                        use_cache=True)
            logp = torch.log_softmax(res.logits.float(), dim=-1).cpu()
            for i, c in enumerate(comps):
                if c:  # token 0 is predicted by the prompt's last position, token k by completion position k-1
                    out[i][j] = float(first_logp[i, c[0]]) + sum(float(logp[i, k - 1, c[k]]) for k in range(1, len(c)))
    return out


def annotate_rows(model, tokenizer, task: Task, rows: list[dict], batch_size: int = 16) -> list[Annotation]:
    """The teacher's label for every row (rows need the task's input fields, not a label)."""
    if not task.labels:
        raise ValueError(f"annotation needs labels; task type {task.type!r} has none (use mode=generate)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for k in range(0, len(rows), batch_size):
        msgs = [annotation_messages(task, row) for row in rows[k : k + batch_size]]
        prompts = [prompt_ids(tokenizer, m) for m in msgs]
        comps = [[completion_ids(tokenizer, m, lab) for lab in task.labels] for m in msgs]
        for scores in score_batch(model, prompts, comps, pad):
            lp = dict(zip(task.labels, scores))
            out.append(Annotation(*_from_logprobs(lp), lp))
    return out


def _from_logprobs(lp: dict) -> tuple[str, float]:
    """The argmax label and its softmax probability over the labels."""
    top = max(lp.values())
    return max(lp, key=lp.get), 1.0 / sum(math.exp(v - top) for v in lp.values())  # exp(top - top) / z


def calibrated(anns: list[Annotation]) -> tuple[list[Annotation], dict]:
    """The annotations with each label's mean log-probability over the pool subtracted before the argmax and
    softmax, and those means. A small teacher's prompt (or its fine-tune) often favours one label for every
    row; the pool mean estimates that prior (as contextual calibration does with a content-free input, Zhao
    et al. 2021), so what is left ranks rows by how much more than usual they look like each label. The raw
    log-probabilities are kept."""
    if not anns:
        return [], {}
    mean = {lab: sum(a.logprobs[lab] for a in anns) / len(anns) for lab in anns[0].logprobs}
    out = [Annotation(*_from_logprobs({k: v - mean[k] for k, v in a.logprobs.items()}), a.logprobs) for a in anns]
    return out, mean


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


def load_teacher(folder: str | Path):
    """The exported teacher for scoring: bf16 on the GPUs it was given (spread over several when it has
    more than one); fp32 on a CPU, where it is the fast path anyway. `embedded:` names resolve on this node."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from s3ray.finetune.export import is_adapter
    from s3ray.models import resolve_teacher

    folder = str(folder)
    if folder.startswith("embedded:"):
        folder = resolve_teacher(folder)
    if is_adapter(folder):
        raise ValueError(f"{folder} is a LoRA adapter; annotate with lora.export=merged")
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    gpus = torch.cuda.device_count()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16 if gpus else torch.float32,
                                                 device_map="auto" if gpus > 1 else None,
                                                 trust_remote_code=False).eval()
    return (model.to("cuda") if gpus == 1 else model), tok


class Scorer:
    """One annotation replica: the teacher loaded once (in a Ray actor the recipe starts, on the GPUs or CPU
    threads it reserved), labelling the chunks of the pool it is handed."""

    def __init__(self, folder: str, task: Task, batch_size: int, threads: int | None = None) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.model, self.tokenizer = load_teacher(folder)
        self.task, self.batch_size = task, batch_size

    def score(self, start: int, rows: list[dict]) -> tuple[int, list[dict]]:
        """(start, the rows' annotations as dicts): the chunk's offset comes back with its result."""
        anns = annotate_rows(self.model, self.tokenizer, self.task, rows, self.batch_size)
        return start, [asdict(a) for a in anns]
