"""The fast `embedding_head` student: one Ray task embeds the rows once with the frozen encoder (mean
pooling) and fits a linear head for `epochs` passes; seconds on a CPU. Tasks whose student head supports it
(label heads: classification and pair)."""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

from s3ray.config import StudentConfig
from s3ray.models import on_this_node
from s3ray.student.checkpoint import HEAD_FILE, write_meta
from s3ray.student.epochs import best_epoch_loop
from s3ray.student.features import encode_texts
from s3ray.student.heads import split_inputs
from s3ray.student.model import EmbeddingHeadModel
from s3ray.student.optim import autocast_for, make_optimizer, make_step
from s3ray.tasks.base import Task

# A frozen-encoder linear head needs far larger steps than fine-tuning a whole encoder does.
HEAD_LR_SCALE = 100.0
EMBED_BATCH = 64


def _embed(model: EmbeddingHeadModel, tokenizer, task: Task, rows, cfg: StudentConfig, device, desc: str):
    """Mean-pooled frozen-encoder embeddings of `task.student_inputs` of each row (n x hidden)."""
    out = []
    for s in tqdm(range(0, len(rows), EMBED_BATCH), desc=f"{desc} embed", leave=False):
        texts_a, texts_b = split_inputs(task, rows[s : s + EMBED_BATCH])
        enc = encode_texts(tokenizer, texts_a, texts_b, cfg.max_length, padding=True, return_tensors="pt")
        with autocast_for(cfg, device):
            out.append(model.embed(**{k: v.to(device) for k, v in enc.items()}).float())
    return torch.cat(out)


def _save(dest: str, model: EmbeddingHeadModel, tokenizer, head_state: dict, meta: dict) -> None:
    """Write the checkpoint to a temp folder, then rename: a half-written folder is never a checkpoint."""
    tmp = Path(dest).with_name(Path(dest).name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.encoder.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_file(head_state, str(tmp / HEAD_FILE))
    write_meta(tmp, kind="embedding_head", **meta)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def fit_embedding_head(
    train_rows, val_rows, task: Task, cfg_dict: dict, model_path: str, dest: str, seed: int, desc: str, threads: int
) -> dict:
    """Runs as one Ray task: embed once with the frozen encoder, fit a linear head, save the best epoch."""
    cfg = StudentConfig.model_validate(cfg_dict)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
    labels_head = task.student_head()
    model_path = on_this_node(model_path)  # embedded or staged weights: this node's copy
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code)
    encoder = AutoModel.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code).to(device).eval()
    head = torch.nn.Linear(encoder.config.hidden_size, len(labels_head.labels))
    model = EmbeddingHeadModel(encoder, head).to(device)

    t0 = time.perf_counter()
    x_train, x_val = _embed(model, tokenizer, task, train_rows, cfg, device, desc), _embed(
        model, tokenizer, task, val_rows, cfg, device, desc)
    y_train = torch.tensor(labels_head.targets(train_rows), device=device)
    embed_seconds = time.perf_counter() - t0

    lr = cfg.learning_rate * HEAD_LR_SCALE
    opt, sched_fn = make_optimizer(head, cfg, math.ceil(len(train_rows) / cfg.batch_size) * cfg.epochs, lr=lr)
    step = make_step(head.parameters(), opt, sched_fn(opt), clip=None)
    gen = torch.Generator().manual_seed(seed)
    best_state: dict = {}

    def train_epoch(epoch: int) -> dict:
        t1 = time.perf_counter()
        head.train()
        perm = torch.randperm(len(train_rows), generator=gen).to(device)
        losses = []
        for s in range(0, len(perm), cfg.batch_size):
            idx = perm[s : s + cfg.batch_size]
            loss = torch.nn.functional.cross_entropy(head(x_train[idx]), y_train[idx])
            step(loss)
            losses.append(float(loss))
        return {"train_loss": sum(losses) / len(losses), "seconds": time.perf_counter() - t1}

    def validate() -> dict:
        head.eval()
        with torch.no_grad():
            preds, _ = labels_head.decode(torch.softmax(head(x_val), -1).cpu().numpy())
        return task.metrics(preds, task.golds(val_rows))

    def keep(epoch: int, val: dict) -> None:
        best_state.update({k: v.detach().float().cpu().clone() for k, v in head.state_dict().items()})

    history, best_epoch = best_epoch_loop(cfg.epochs, task, train_epoch, validate, keep)
    _save(dest, model, tokenizer, best_state, {
        "task_type": task.type, "labels": task.labels, "max_length": cfg.max_length, "base_model": model_path,
        "epoch": best_epoch, "val_metrics": history[best_epoch - 1]["val"], "head_learning_rate": lr,
    })
    return {
        "history": history,
        "best_epoch": best_epoch,
        "embed_seconds": embed_seconds,
        "head_seconds": sum(h["seconds"] for h in history),
    }
