"""Train a student with Ray Train (DDP or DeepSpeed ZeRO), keep the best epoch on the validation rows.

The driver tokenises once and hands the features to the workers through the object store; each worker
builds the model, trains on its shard, and after every epoch all workers predict a shard of the validation
rows, gather the predictions, and agree on the metric. A new best epoch is saved as a Ray Train checkpoint
(an ordinary HF folder, see checkpoint.py), which ends up at `out_dir/checkpoint`.

Modules: loop.py (shared epoch loop and data), worker.py (the Ray Train per-worker loop), embedding_head.py
(`kind="embedding_head"`: no Ray Train, one Ray task embeds the rows once with the frozen encoder and fits a
linear head for `epochs` passes, seconds on a CPU), predict.py (inference), checkpoint.py (the folder format).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from s3ray.config import StudentConfig
from s3ray.student.loop import check_rows, golds_of, make_loader, make_optimizer, run_epoch, train_features
from s3ray.student.predict import StudentPredictor
from s3ray.tasks.base import Task

log = logging.getLogger("s3ray.student")


@dataclass
class StudentResult:
    checkpoint: str  # HF folder of the best epoch: model + tokenizer + s3ray_student.json
    best_epoch: int  # 1-based
    val_metrics: dict  # task.metrics on the validation rows at the best epoch
    history: list[dict]  # per epoch: {"epoch", "train_loss", "val", "seconds", ...}
    train_seconds: float  # time inside the training loops (all epochs), without start-up and validation
    n_train: int
    samples_per_second: float  # n_train * epochs / train_seconds
    wall_seconds: float = 0.0  # the whole call, Ray Train start-up included
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------- driver side


def _ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        from s3ray.runtime import init_ray

        init_ray()


def _cpus_per_worker(cfg: StudentConfig) -> int:
    """Give the workers the free CPUs (torch threads follow), but never more threads than this machine has
    cores when the cluster is just this machine."""
    import ray

    from s3ray.runtime import cap_to_local_cores

    avail = ray.available_resources().get("CPU", 0.0)
    if avail < cfg.num_workers:
        log.warning(
            "student: %d worker(s) need %d CPUs but Ray has %.1f free (teacher replicas still up?); "
            "Ray Train waits for them",
            cfg.num_workers,
            cfg.num_workers,
            avail,
        )
    return max(1, int(cap_to_local_cores(avail) // cfg.num_workers))


def _check_cfg(cfg: StudentConfig, task: Task) -> None:
    """Config mistakes, found before any process starts or model loads."""
    if task.type not in ("classification", "pair", "extractive_qa"):
        raise ValueError(f"task type {task.type!r}: the student trains classification, pair or extractive_qa")
    if cfg.kind == "embedding_head" and task.type == "extractive_qa":
        raise ValueError(
            "student.kind=embedding_head supports classification and pair tasks only; "
            "use student.kind=finetune for extractive_qa"
        )
    if cfg.mixed_precision == "fp16" and not cfg.use_gpu:
        raise ValueError("student.mixed_precision=fp16 needs student.use_gpu=true; on CPUs use bf16 or no")


def _check_gpus(cfg: StudentConfig) -> None:
    import ray

    if cfg.use_gpu:
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus < cfg.num_workers:
            raise ValueError(
                f"student.use_gpu=true with student.num_workers={cfg.num_workers}, but the Ray "
                f"cluster has {gpus:g} GPUs; lower num_workers or set use_gpu=false"
            )


def _run_name(desc: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", desc).strip("-") or "student"
    return f"{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def train_student(
    train_rows: list[dict],
    val_rows: list[dict],
    task: Task,
    cfg: StudentConfig,
    model_path: str,
    out_dir: str | Path,
    seed: int,
    desc: str = "student",
) -> StudentResult:
    """Fine-tune `model_path` on train_rows (Ray Train, cfg.num_workers workers), pick the best epoch on
    val_rows by task.primary_metric, and return where its checkpoint is (out_dir/checkpoint)."""
    _check_cfg(cfg, task)
    train_rows = check_rows(train_rows, task, f"{desc} training rows")
    val_rows = check_rows(val_rows, task, f"{desc} validation rows")
    _ensure_ray()
    _check_gpus(cfg)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.kind == "embedding_head":
        return _train_embedding_head(train_rows, val_rows, task, cfg, model_path, out_dir, seed, desc)

    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from transformers import AutoTokenizer

    from s3ray.student.worker import train_loop

    t_start, t_start_unix = time.perf_counter(), time.time()
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code)
    features = train_features(tokenizer, train_rows, task, cfg.max_length)
    data_ref = ray.put({"features": features, "val_rows": val_rows})
    threads = _cpus_per_worker(cfg)
    # Ray Train V2 polls its workers every 2 s and starts a preemption-watcher actor per run; a student run
    # is short and restarts cheaply, so poll faster and skip the watcher (unless the user set these).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "cfg": cfg.model_dump(),
            "task": task,
            "data_ref": data_ref,
            "model_path": str(model_path),
            "seed": seed,
            "threads": threads,
            "desc": desc,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": threads}
        ),
        run_config=RunConfig(
            name=_run_name(desc),
            storage_path=str(out_dir / "ray_train"),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )
    log.info(
        "%s: training on %d rows (%d features), %d worker(s) x %d CPU, %s",
        desc,
        len(train_rows),
        len(features),
        cfg.num_workers,
        threads,
        cfg.strategy,
    )
    t_fit = time.time()
    result = trainer.fit()
    t_fitted = time.time()
    if getattr(result, "error", None):
        raise RuntimeError(f"{desc}: Ray Train failed") from result.error
    if result.checkpoint is None or not result.metrics:
        raise RuntimeError(f"{desc}: Ray Train finished without a checkpoint/metrics (see the worker logs)")
    history = json.loads(result.metrics["history_json"])
    best_epoch = int(result.metrics["best_epoch"])
    dest = out_dir / "checkpoint"
    shutil.rmtree(dest, ignore_errors=True)
    with result.checkpoint.as_directory() as src:
        shutil.copytree(src, dest)
    loop = float(result.metrics["train_loop_seconds"])
    wall = time.perf_counter() - t_start
    return StudentResult(
        checkpoint=str(dest),
        best_epoch=best_epoch,
        val_metrics=history[best_epoch - 1]["val"],
        history=history,
        train_seconds=loop,
        n_train=len(train_rows),
        samples_per_second=len(features) * cfg.epochs / loop if loop > 0 else float("nan"),
        wall_seconds=wall,
        extra={
            "n_features": len(features),
            "cpus_per_worker": threads,
            "ray_run": str(result.path),
            # where the wall time goes besides the training loops
            "ray_start_seconds": result.metrics["worker_enter_unix"] - t_fit,  # controller + workers up
            "worker_setup_seconds": result.metrics["worker_setup_seconds"],  # imports, model load, DDP/DS
            "val_seconds": sum(h["val_seconds"] for h in history),
            "ray_finish_seconds": t_fitted - result.metrics["worker_done_unix"],
            "driver_prep_seconds": t_fit - t_start_unix,  # tokenisation
        },
    )


def _train_embedding_head(
    train_rows, val_rows, task, cfg, model_path, out_dir: Path, seed, desc
) -> StudentResult:
    import ray

    from s3ray.student.embedding_head import fit_embedding_head

    t0 = time.perf_counter()
    threads = _cpus_per_worker(cfg.model_copy(update={"num_workers": 1}))
    remote = ray.remote(num_cpus=threads, num_gpus=1 if cfg.use_gpu else 0)(fit_embedding_head)
    dest = out_dir / "checkpoint"
    out = ray.get(
        remote.remote(
            train_rows, val_rows, task, cfg.model_dump(), str(model_path), str(dest), seed, desc, threads
        )
    )
    train_seconds = out["embed_seconds"] + out["head_seconds"]
    return StudentResult(
        checkpoint=str(dest),
        best_epoch=out["best_epoch"],
        val_metrics=out["history"][out["best_epoch"] - 1]["val"],
        history=out["history"],
        train_seconds=train_seconds,
        n_train=len(train_rows),
        samples_per_second=len(train_rows) * cfg.epochs / train_seconds
        if train_seconds > 0
        else float("nan"),
        wall_seconds=time.perf_counter() - t0,
        extra={"embed_seconds": out["embed_seconds"], "head_seconds": out["head_seconds"]},
    )


# ----------------------------------------------------------------------------------- plain loop (baseline)


def train_plain(
    train_rows: list[dict],
    task: Task,
    cfg: StudentConfig,
    model_path: str,
    seed: int,
    threads: int | None = None,
) -> dict:
    """The same data, model, optimiser and epoch loop as a Ray Train worker, in this process and without
    Ray: the baseline that benchmarks/student_training.py compares Ray Train against. No validation."""
    from transformers import AutoTokenizer

    from s3ray.student.model import build_finetune_model

    if threads:
        torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code)
    features = train_features(tokenizer, check_rows(train_rows, task, "training rows"), task, cfg.max_length)
    torch.manual_seed(seed)
    model = build_finetune_model(model_path, task.type, task.labels, cfg.trust_remote_code)
    loader, sampler = make_loader(features, tokenizer, cfg.batch_size, seed)
    opt, sched_fn = make_optimizer(model, cfg, len(loader) * cfg.epochs)
    sched = sched_fn(opt)
    device = torch.device("cuda" if cfg.use_gpu else "cpu")
    model.to(device)

    def step(loss):
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    losses, seconds = [], 0.0
    for epoch in range(1, cfg.epochs + 1):
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        loss, _ = run_epoch(model, loader, step, device, cfg, progress=True, desc=f"plain epoch {epoch}")
        seconds += time.perf_counter() - t0
        losses.append(loss)
    return {
        "train_seconds": seconds,
        "n_features": len(features),
        "losses": losses,
        "samples_per_second": len(features) * cfg.epochs / seconds,
    }


# --------------------------------------------------------------------------------------------- evaluate


def evaluate_student(checkpoint: str, rows: list[dict], task: Task, cfg: StudentConfig) -> dict:
    """task.metrics of a saved student on rows (a plain batched loop in this process, no Ray)."""
    predictor = StudentPredictor(checkpoint, batch_size=cfg.batch_size * 2)
    predictor.task = task  # the caller's task builds the inputs, exactly as in training
    preds, _ = predictor.predict_rows(rows, progress=True)
    return task.metrics(preds, golds_of(rows, task))
