"""The pieces every student training path shares: row checks, tokenised features, loader, optimiser,
the epoch loop, and prediction for the validation metric. Ray-free, so the plain-PyTorch baseline in
benchmarks/ runs exactly the same code as a Ray Train worker."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from s3ray.config import StudentConfig
from s3ray.student.features import check_qa_rows, encode_texts, qa_train_features
from s3ray.student.predict import classify_probs, qa_predict
from s3ray.tasks.base import Task


def check_rows(rows: list[dict], task: Task, where: str) -> list[dict]:
    """The rows, or a clear error naming the first bad row (QA rows with a misplaced answer are re-located
    or dropped and counted, see features.check_qa_rows)."""
    if not rows:
        raise ValueError(f"{where}: no rows (the student needs at least one)")
    if task.type == "extractive_qa":
        return check_qa_rows(rows, where)
    bad = [(r.get("id", i), p) for i, r in enumerate(rows) if (p := task.validate_row(r))]
    if bad:
        raise ValueError(
            f"{where}: {len(bad)} of {len(rows)} rows don't fit the {task.type} task, "
            f"e.g. row {bad[0][0]}: {bad[0][1]}"
        )
    return rows


def train_features(tokenizer, rows: list[dict], task: Task, max_length: int) -> list[dict]:
    """Token ids (unpadded) + targets, one dict per training feature."""
    if task.type == "extractive_qa":
        return qa_train_features(tokenizer, rows, max_length)
    label2id = {lab: i for i, lab in enumerate(task.labels or [])}
    inputs = [task.student_inputs(r) for r in rows]
    enc = encode_texts(tokenizer, [a for a, _ in inputs], [b for _, b in inputs], max_length)
    return [{**{k: enc[k][i] for k in enc}, "labels": label2id[r["label"]]} for i, r in enumerate(rows)]


def make_loader(features: list[dict], tokenizer, batch_size: int, seed: int, rank: int = 0, world: int = 1):
    """Seeded shuffling (a DistributedSampler, also for one worker, so 1 and N workers see the same order
    rules) and dynamic padding per batch."""
    from torch.utils.data import DataLoader, DistributedSampler
    from transformers import DataCollatorWithPadding

    sampler = DistributedSampler(features, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    return DataLoader(features, batch_size=batch_size, sampler=sampler, collate_fn=collate), sampler


def make_optimizer(model: torch.nn.Module, cfg: StudentConfig, total_steps: int):
    """AdamW without weight decay on biases and norms, and a linear warm-up then linear decay."""
    from transformers import get_linear_schedule_with_warmup

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate,
    )
    warmup = int(cfg.warmup_ratio * total_steps)
    return opt, (lambda o: get_linear_schedule_with_warmup(o, warmup, total_steps))


def autocast_for(cfg: StudentConfig, device: torch.device):
    if cfg.mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def run_epoch(
    model,
    loader,
    step: Callable[[torch.Tensor], None],
    device,
    cfg: StudentConfig,
    progress: bool = False,
    desc: str = "train",
) -> tuple[float, int]:
    """One pass over `loader`: forward (under autocast when asked), then `step(loss)`. Returns (mean loss,
    samples seen). Shared by the Ray Train workers and the plain-PyTorch benchmark loop."""
    from tqdm.auto import tqdm

    model.train()
    total, batches, seen = 0.0, 0, 0
    for batch in tqdm(loader, disable=not progress, desc=desc, leave=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast_for(cfg, device):
            loss = model(**batch).loss
        step(loss)
        total += float(loss.detach())
        batches += 1
        seen += int(batch["input_ids"].shape[0])
    return total / max(batches, 1), seen


def predict_for_metrics(
    model, tokenizer, rows: list[dict], task: Task, max_length: int, batch_size: int, device
) -> list[str]:
    """Predicted label names (QA: answer texts) for rows, as `task.metrics` wants them."""
    if task.type == "extractive_qa":
        answers, _ = qa_predict(
            model,
            tokenizer,
            [r["question"] for r in rows],
            [r["context"] for r in rows],
            max_length,
            batch_size,
            device,
        )
        return answers
    inputs = [task.student_inputs(r) for r in rows]
    texts_b = [b for _, b in inputs]
    probs = classify_probs(
        model,
        tokenizer,
        [a for a, _ in inputs],
        None if all(b is None for b in texts_b) else texts_b,
        max_length,
        batch_size,
        device,
    )
    return [task.labels[i] for i in probs.argmax(1)]


def golds_of(rows: list[dict], task: Task) -> list[str]:
    return [r["answer"] if task.type == "extractive_qa" else r["label"] for r in rows]


def primary_value(metrics: dict, task: Task) -> float:
    if task.primary_metric not in metrics:
        raise KeyError(
            f"task.metrics returned {sorted(metrics)}, without the primary metric {task.primary_metric!r}"
        )
    return float(metrics[task.primary_metric])
