"""The epoch loops every student shares: one pass over a loader, and the best-epoch loop (train, validate,
keep the epoch with the best primary metric). Ray-free, so a Ray Train worker, the embedding-head Ray task
and the plain-PyTorch benchmark run exactly the same code."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from s3ray.config import StudentConfig
from s3ray.student.optim import autocast_for


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
    samples seen)."""
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


def best_epoch_loop(
    epochs: int,
    task,
    train_epoch: Callable[[int], dict],
    validate: Callable[[], dict],
    on_best: Callable[[int, dict], None],
    after_epoch: Callable[[int, float, int], None] | None = None,
) -> tuple[list[dict], int]:
    """For each epoch: `train_epoch(epoch)` (returns at least train_loss and seconds), `validate()` (the
    task's metrics), and `on_best(epoch, val)` when the primary metric beats every earlier epoch (ties keep
    the earlier one). Returns (history, best epoch, 1-based)."""
    history: list[dict] = []
    best, best_epoch = -math.inf, 0
    for epoch in range(1, epochs + 1):
        record = {"epoch": epoch, **train_epoch(epoch)}
        t0 = time.perf_counter()
        record["val"] = validate()
        record["val_seconds"] = time.perf_counter() - t0
        history.append(record)
        score = task.score(record["val"])
        if score > best:
            best, best_epoch = score, epoch
            on_best(epoch, record["val"])
        if after_epoch is not None:
            after_epoch(epoch, score, best_epoch)
    return history, best_epoch
