"""Train a student with Ray Train (DDP or DeepSpeed ZeRO), keep the best epoch on the validation rows.

The driver tokenises once and hands the features to the workers through the object store; each worker
builds the model, trains on its shard, and after every epoch all workers predict a shard of the validation
rows, gather the predictions, and agree on the metric. A new best epoch is saved as a Ray Train checkpoint
(an ordinary HF folder, see checkpoint.py), which ends up at `out_dir/checkpoint`.

Modules: heads.py (what a task's student is), features.py, optim.py, epochs.py (the shared best-epoch
loop), strategies.py (DDP / DeepSpeed), worker.py (the Ray Train per-worker loop), embedding_head.py
(`kind="embedding_head"`: no Ray Train, one Ray task embeds the rows once with the frozen encoder and fits
a linear head), predict.py (inference), checkpoint.py (the folder format). Ray is imported inside the
driver functions: importing s3ray.student must not start or import Ray.
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

from transformers import AutoTokenizer

from s3ray import storage
from s3ray.capacity import describe_nodes, place, shape, worker_cpus, worker_unit
from s3ray.config import StudentConfig
from s3ray.models import on_this_node
from s3ray.runtime import fit_keeping_ctrl_c, init_ray, local_cores, node_resources
from s3ray.student.embedding_head import fit_embedding_head
from s3ray.student.predict import StudentPredictor
from s3ray.student.worker import train_loop
from s3ray.tasks.base import Task

log = logging.getLogger("s3ray.student")


@dataclass
class TrainResult:
    """A trained student; every field is JSON-able (the pipeline stores `asdict(result)`)."""

    checkpoint: str  # HF folder of the best epoch: model + tokenizer + s3ray_student.json
    best_epoch: int  # 1-based
    val_metrics: dict  # task.metrics on the validation rows at the best epoch
    history: list[dict]  # per epoch: {"epoch", "train_loss", "val", "seconds", "val_seconds", ...}
    train_seconds: float  # time inside the training loops (all epochs), without start-up and validation
    n_train: int
    samples_per_second: float  # training features * epochs / train_seconds
    wall_seconds: float = 0.0  # the whole call, Ray Train start-up included
    extra: dict = field(default_factory=dict)  # cpus_per_worker, strategy (zero_stage), timing breakdown


@dataclass
class EvalResult:
    """A saved student's metrics on some rows (plain, JSON-able)."""

    metrics: dict  # task.metrics (primary and secondary metric, n)
    n_rows: int
    seconds: float


# ---------------------------------------------------------------------------------------- CPU sizing


def _cluster_worker_cpus(cfg: StudentConfig, num_workers: int) -> int:
    """CPUs per worker from the free resources of the nodes the workers can run on (capacity.worker_cpus),
    never the cluster's CPU count divided among the workers."""
    nodes = node_resources()
    frees = [n.free for n in nodes]
    cores = local_cores() if len(nodes) == 1 else None  # one node: more threads than cores run slower
    cpus = worker_cpus(frees, num_workers, cfg.use_gpu, cfg.cpus_per_worker, cores)
    unit = worker_unit(cpus, cfg.use_gpu)
    if place([unit] * num_workers, frees) < num_workers:
        log.warning("student: %d worker(s) of %s do not fit in the free resources now (free per node: %s); "
                    "Ray Train waits for them", num_workers, shape(unit), describe_nodes(nodes))
    return cpus


# ---------------------------------------------------------------------------------------- driver side


def _check_cfg(cfg: StudentConfig, task: Task) -> None:
    """Config mistakes, found before any process starts or model loads."""
    if cfg.kind == "embedding_head" and not task.student_head().supports_embedding_head:
        raise ValueError(
            f"student.kind=embedding_head fits a linear head on labels; the {task.type} task's student "
            "has another head: use student.kind=finetune"
        )
    if cfg.mixed_precision == "fp16" and not cfg.use_gpu:
        raise ValueError("student.mixed_precision=fp16 needs student.use_gpu=true; on CPUs use bf16 or no")


def _start_ray(cfg: StudentConfig) -> None:
    import ray  # lazily, see the module docstring

    if not ray.is_initialized():
        init_ray()
    workers = 1 if cfg.kind == "embedding_head" else cfg.num_workers
    nodes = node_resources()
    unit = worker_unit(cfg.cpus_per_worker or 1, cfg.use_gpu)
    if place([unit] * workers, [dict(n.total) for n in nodes]) < workers:  # no waiting makes them fit
        raise ValueError(
            f"student: {workers} worker(s) of {shape(unit)} (student.num_workers, student.cpus_per_worker, "
            f"student.use_gpu) do not fit this cluster's nodes even when idle ({describe_nodes(nodes, free=False)}); "
            "lower num_workers or cpus_per_worker, or set use_gpu=false"
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
    storage_uri: str | None = None,
) -> TrainResult:
    """Fine-tune `model_path` on train_rows (Ray Train, cfg.num_workers workers), pick the best epoch on
    val_rows by task.primary_metric, and return where its checkpoint is (out_dir/checkpoint, local).

    `storage_uri` (an object store folder every node sees): workers write Ray Train's checkpoints there, not
    to `out_dir` on their own node (Ray Train V2 refuses node-local storage on several nodes)."""
    _check_cfg(cfg, task)
    train_rows = task.check_student_rows(train_rows, f"{desc} training rows")
    val_rows = task.check_student_rows(val_rows, f"{desc} validation rows")
    _start_ray(cfg)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.kind == "embedding_head":
        return _train_embedding_head(train_rows, val_rows, task, cfg, model_path, out_dir, seed, desc, storage_uri)
    return _train_ray(train_rows, val_rows, task, cfg, model_path, out_dir, seed, desc, storage_uri)


def _ray_storage(out_dir: Path, storage_uri: str | None) -> dict:
    """RunConfig storage arguments: the run's object store folder, else `out_dir` on this (shared) disk."""
    if storage_uri is None:
        return {"storage_path": str(out_dir / "ray_train")}
    fs, path = storage.resolve(storage.join(storage_uri, "ray_train"))
    return {"storage_path": path, "storage_filesystem": fs}


def _drop_ray_train_copy(out_dir: Path, storage_uri: str | None) -> None:
    """Ray Train's own run folder holds a second copy of the checkpoint just copied to `out_dir`; a student
    run never resumes from it (a killed step trains again), so it would only double the run's storage."""
    if storage_uri is None:
        shutil.rmtree(out_dir / "ray_train", ignore_errors=True)
    else:
        storage.delete_dir(storage.join(storage_uri, "ray_train"))


def _fit(train_config: dict, cfg: StudentConfig, threads: int, out_dir: Path, desc: str,
         storage_uri: str | None = None):
    """Run Ray Train's TorchTrainer over worker.train_loop; its Result, or a clear error."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig  # lazily, see the module docstring
    from ray.train.torch import TorchTrainer

    # Ray Train V2 polls its workers every 2 s and starts a preemption-watcher actor per run; a student run
    # is short and restarts cheaply, so poll faster and skip the watcher (unless the user set these).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=train_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": threads, **cfg.resources}
        ),
        run_config=RunConfig(
            name=_run_name(desc),
            **_ray_storage(out_dir, storage_uri),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )
    result = fit_keeping_ctrl_c(trainer)
    if getattr(result, "error", None):
        raise RuntimeError(f"{desc}: Ray Train failed") from result.error
    if result.checkpoint is None or not result.metrics:
        raise RuntimeError(f"{desc}: Ray Train finished without a checkpoint/metrics (see the worker logs)")
    return result


def _train_ray(train_rows, val_rows, task: Task, cfg: StudentConfig, model_path, out_dir: Path, seed, desc,
               storage_uri=None):
    import ray  # lazily, see the module docstring

    t_start, t_start_unix = time.perf_counter(), time.time()
    tokenizer = AutoTokenizer.from_pretrained(on_this_node(model_path), trust_remote_code=cfg.trust_remote_code)
    features = task.student_head().features(tokenizer, train_rows, cfg.max_length)
    threads = _cluster_worker_cpus(cfg, cfg.num_workers)
    train_config = {"cfg": cfg.model_dump(), "task": task, "model_path": str(model_path), "seed": seed,
                    "data_ref": ray.put({"features": features, "val_rows": val_rows}), "threads": threads,
                    "desc": desc}
    log.info("%s: training on %d rows (%d features), %d worker(s) x %d CPU, %s", desc, len(train_rows),
             len(features), cfg.num_workers, threads, cfg.strategy)
    t_fit = time.time()
    result = _fit(train_config, cfg, threads, out_dir, desc, storage_uri)
    t_fitted = time.time()
    m = result.metrics
    history, best_epoch = json.loads(m["history_json"]), int(m["best_epoch"])
    dest = out_dir / "checkpoint"
    with result.checkpoint.as_directory() as src:
        storage.replace_local_dir(src, dest)
    _drop_ray_train_copy(out_dir, storage_uri)
    loop = float(m["train_loop_seconds"])
    return TrainResult(
        checkpoint=str(dest),
        best_epoch=best_epoch,
        val_metrics=history[best_epoch - 1]["val"],
        history=history,
        train_seconds=loop,
        n_train=len(train_rows),
        samples_per_second=len(features) * cfg.epochs / loop if loop > 0 else float("nan"),
        wall_seconds=time.perf_counter() - t_start,
        extra={
            "n_features": len(features),
            "cpus_per_worker": threads,
            **json.loads(m["strategy_json"]),  # strategy, and for DeepSpeed the engine's real ZeRO stage
            # where the wall time goes besides the training loops
            "ray_start_seconds": m["worker_enter_unix"] - t_fit,  # controller + workers up
            "worker_setup_seconds": m["worker_setup_seconds"],  # imports, model load, DDP/DS
            "val_seconds": sum(h["val_seconds"] for h in history),
            "ray_finish_seconds": t_fitted - m["worker_done_unix"],
            "driver_prep_seconds": t_fit - t_start_unix,  # tokenisation
        },
    )


def _fit_and_upload(*args, storage_uri: str | None = None) -> dict:
    """In the Ray task: fit the head; with `storage_uri`, its checkpoint goes there (the task's node may not
    be the driver's)."""
    if storage_uri is None:
        return fit_embedding_head(*args)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="s3ray-head-") as tmp:
        args = list(args)
        args[5] = str(Path(tmp) / "checkpoint")  # dest
        out = fit_embedding_head(*args)
        storage.delete_dir(storage.join(storage_uri, "checkpoint"))
        storage.upload_dir(args[5], storage.join(storage_uri, "checkpoint"))
    return out


def _train_embedding_head(train_rows, val_rows, task, cfg, model_path, out_dir: Path, seed, desc,
                          storage_uri=None) -> TrainResult:
    import ray  # lazily, see the module docstring

    t0 = time.perf_counter()
    threads = _cluster_worker_cpus(cfg, 1)
    remote = ray.remote(num_cpus=threads, num_gpus=1 if cfg.use_gpu else 0, resources=cfg.resources or None)(
        _fit_and_upload)
    dest = out_dir / "checkpoint"
    out = ray.get(remote.remote(train_rows, val_rows, task, cfg.model_dump(), str(model_path), str(dest), seed,
                                desc, threads, storage_uri=storage_uri))
    if storage_uri is not None:
        storage.download(storage.join(storage_uri, "checkpoint"), dest)
    train_seconds = out["embed_seconds"] + out["head_seconds"]
    return TrainResult(
        checkpoint=str(dest),
        best_epoch=out["best_epoch"],
        val_metrics=out["history"][out["best_epoch"] - 1]["val"],
        history=out["history"],
        train_seconds=train_seconds,
        n_train=len(train_rows),
        samples_per_second=len(train_rows) * cfg.epochs / train_seconds if train_seconds > 0 else float("nan"),
        wall_seconds=time.perf_counter() - t0,
        extra={"embed_seconds": out["embed_seconds"], "head_seconds": out["head_seconds"],
               "cpus_per_worker": threads},
    )


# --------------------------------------------------------------------------------------------- evaluate


def evaluate_student(checkpoint: str, rows: list[dict], task: Task, cfg: StudentConfig) -> EvalResult:
    """task.metrics of a saved student on rows (a plain batched loop in this process, no Ray). The caller's
    task builds the inputs, exactly as in training."""
    t0 = time.perf_counter()
    predictor = StudentPredictor(checkpoint, batch_size=cfg.batch_size * 2, task=task)
    preds, _ = predictor.predict_rows(rows, progress=True)
    return EvalResult(task.metrics(preds, task.golds(rows)), len(rows), time.perf_counter() - t0)
