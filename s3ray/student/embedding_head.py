"""The fast `embedding_head` student: one Ray task embeds the rows once with the frozen encoder (mean
pooling) and fits a linear head for `epochs` passes; seconds on a CPU. Classification and pair only."""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from s3ray.config import StudentConfig
from s3ray.student.checkpoint import HEAD_FILE, write_meta
from s3ray.student.features import encode_texts
from s3ray.student.loop import autocast_for, golds_of, primary_value
from s3ray.tasks.base import Task

# A frozen-encoder linear head needs far larger steps than fine-tuning a whole encoder does.
HEAD_LR_SCALE = 100.0


def fit_embedding_head(
    train_rows,
    val_rows,
    task: Task,
    cfg_dict: dict,
    model_path: str,
    dest: str,
    seed: int,
    desc: str,
    threads: int,
) -> dict:
    """Runs as one Ray task: embed once with the frozen encoder, fit a linear head, save the best epoch."""
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoTokenizer

    from s3ray.student.model import EmbeddingHeadModel

    cfg = StudentConfig.model_validate(cfg_dict)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code)
    encoder = AutoModel.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code).to(device).eval()
    n_labels = len(task.labels)
    model = EmbeddingHeadModel(encoder, torch.nn.Linear(encoder.config.hidden_size, n_labels)).to(device)
    label2id = {lab: i for i, lab in enumerate(task.labels)}

    def embed(rows):
        from tqdm.auto import tqdm

        inputs = [task.student_inputs(r) for r in rows]
        out = []
        for s in tqdm(range(0, len(rows), 64), desc=f"{desc} embed", leave=False):
            a = [x for x, _ in inputs[s : s + 64]]
            b = [y for _, y in inputs[s : s + 64]]
            enc = encode_texts(tokenizer, a, b, cfg.max_length, padding=True, return_tensors="pt")
            with autocast_for(cfg, device):
                out.append(model.embed(**{k: v.to(device) for k, v in enc.items()}).float())
        return torch.cat(out)

    t0 = time.perf_counter()
    x_train, x_val = embed(train_rows), embed(val_rows)
    y_train = torch.tensor([label2id[r["label"]] for r in train_rows], device=device)
    embed_seconds = time.perf_counter() - t0

    head = model.head
    lr = cfg.learning_rate * HEAD_LR_SCALE
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    from transformers import get_linear_schedule_with_warmup

    steps_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
    sched = get_linear_schedule_with_warmup(
        opt, int(cfg.warmup_ratio * steps_per_epoch * cfg.epochs), steps_per_epoch * cfg.epochs
    )
    gen = torch.Generator().manual_seed(seed)
    history, best, best_epoch, best_state = [], -math.inf, 0, None
    golds = golds_of(val_rows, task)
    for epoch in range(1, cfg.epochs + 1):
        t1 = time.perf_counter()
        head.train()
        perm = torch.randperm(len(train_rows), generator=gen).to(device)
        losses = []
        for s in range(0, len(perm), cfg.batch_size):
            idx = perm[s : s + cfg.batch_size]
            loss = torch.nn.functional.cross_entropy(head(x_train[idx]), y_train[idx])
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
        seconds = time.perf_counter() - t1
        head.eval()
        with torch.no_grad():
            preds = [task.labels[i] for i in head(x_val).argmax(1).tolist()]
        val = task.metrics(preds, golds)
        score = primary_value(val, task)
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val": val, "seconds": seconds})
        if score > best:
            best, best_epoch = score, epoch
            best_state = {k: v.detach().float().cpu().clone() for k, v in head.state_dict().items()}

    tmp = Path(dest).with_name(Path(dest).name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    encoder.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_file(best_state, str(tmp / HEAD_FILE))
    write_meta(
        tmp,
        kind="embedding_head",
        task_type=task.type,
        labels=task.labels,
        max_length=cfg.max_length,
        base_model=model_path,
        epoch=best_epoch,
        val_metrics=history[best_epoch - 1]["val"],
        head_learning_rate=lr,
    )
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)  # atomic: a half-written folder is never mistaken for a checkpoint
    return {
        "history": history,
        "best_epoch": best_epoch,
        "embed_seconds": embed_seconds,
        "head_seconds": sum(h["seconds"] for h in history),
    }
