"""Train a student with Ray Train (DDP or DeepSpeed ZeRO), keep the best epoch on the validation rows.

The driver tokenises once and hands the features to the workers through the object store; each worker
builds the model, trains on its shard, and after every epoch all workers predict a shard of the validation
rows, gather the predictions, and agree on the metric. A new best epoch is saved as a Ray Train checkpoint
(an ordinary HF folder, see checkpoint.py), which ends up at `out_dir/checkpoint`.

`kind="embedding_head"` skips Ray Train: one Ray task embeds the rows once with the frozen encoder and fits a
linear head for `epochs` passes (seconds on a CPU).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from s3ray.config import StudentConfig
from s3ray.student.checkpoint import HEAD_FILE, write_meta
from s3ray.student.features import check_qa_rows, encode_texts, qa_train_features
from s3ray.student.predict import StudentPredictor, classify_probs, qa_predict
from s3ray.tasks.base import Task

log = logging.getLogger("s3ray.student")

# A frozen-encoder linear head needs far larger steps than fine-tuning a whole encoder does.
HEAD_LR_SCALE = 100.0


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


# --------------------------------------------------------------------------------------------- data


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


# ------------------------------------------------------------------------------------ Ray Train loop


def _gather(obj, world: int) -> list:
    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _sharded_val(model, tokenizer, rows, task, max_length, batch_size, device, rank, world) -> list[str]:
    """Every rank predicts an equal-sized slice (padded with repeats, so all ranks run the same number of
    forward passes: ZeRO-3 gathers weights collectively), then all ranks get all predictions."""
    per = math.ceil(len(rows) / world)
    mine = list(range(rank * per, min(len(rows), (rank + 1) * per)))
    padded = mine + [mine[-1] if mine else 0] * (per - len(mine))
    preds = predict_for_metrics(
        model, tokenizer, [rows[i] for i in padded], task, max_length, batch_size, device
    )
    merged: dict[int, str] = {}
    for part in _gather(list(zip(mine, preds[: len(mine)])), world):
        merged.update(part)
    return [merged[i] for i in range(len(rows))]


def _train_loop(config: dict) -> None:
    """Runs in every Ray Train worker."""
    t_enter = time.time()
    import ray
    import ray.train
    import torch.distributed as dist
    from ray.train.torch import get_device, prepare_data_loader, prepare_model
    from transformers import AutoTokenizer

    from s3ray.student.model import build_finetune_model

    cfg = StudentConfig.model_validate(config["cfg"])
    task: Task = config["task"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    data = ray.get(config["data_ref"])
    val_rows = data["val_rows"]
    device = get_device()

    tokenizer = AutoTokenizer.from_pretrained(config["model_path"], trust_remote_code=cfg.trust_remote_code)
    torch.manual_seed(config["seed"])  # the new head's initial weights
    model = build_finetune_model(config["model_path"], task.type, task.labels, cfg.trust_remote_code)
    loader, sampler = make_loader(data["features"], tokenizer, cfg.batch_size, config["seed"], rank, world)
    total_steps = len(loader) * cfg.epochs
    opt, sched_fn = make_optimizer(model, cfg, total_steps)

    if cfg.strategy == "deepspeed":
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.use_gpu else "cpu")
        import deepspeed

        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.batch_size,
            "train_batch_size": cfg.batch_size * world,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0,
            "zero_optimization": {"stage": cfg.zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": cfg.mixed_precision == "bf16"},
            "fp16": {"enabled": cfg.mixed_precision == "fp16"},
            "steps_per_print": 10**9,
        }
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched_fn, config=ds_config
        )
        device = engine.device
        train_model, eval_model = engine, engine

        def step(loss):
            engine.backward(loss)
            engine.step()  # optimizer, scheduler, zero_grad

        def state_for_save():
            if cfg.zero_stage == 3:  # weights are partitioned: every rank takes part in gathering them
                return engine._zero3_consolidated_16bit_state_dict()
            return engine.module.state_dict()

        module = engine.module
        ds_cfg = cfg.model_copy(update={"mixed_precision": "no"})  # DeepSpeed casts the model itself
    else:
        model = prepare_model(model)  # DDP when world > 1, moves to the device
        loader = prepare_data_loader(loader, add_dist_sampler=False)  # our seeded sampler already shards
        sched = sched_fn(opt)
        scaler = torch.amp.GradScaler(
            device.type, enabled=cfg.mixed_precision == "fp16" and device.type == "cuda"
        )
        module = model.module if hasattr(model, "module") else model
        train_model, eval_model = model, module

        def step(loss):
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            sched.step()
            opt.zero_grad(set_to_none=True)

        def state_for_save():
            return module.state_dict()

        ds_cfg = cfg

    t_ready = time.time()
    history: list[dict] = []
    best, best_epoch, loop_seconds = -math.inf, 0, 0.0
    # Rank 0 keeps the best epoch's HF folder here and hands it to Ray Train once, with the full history:
    # Ray Train V2 keeps only the metrics that come with a checkpoint, and one upload beats one per epoch.
    with tempfile.TemporaryDirectory(prefix="s3ray-best-", ignore_cleanup_errors=True) as keep:
        best_dir = Path(keep) / "best"
        for epoch in range(1, cfg.epochs + 1):
            sampler.set_epoch(epoch)
            t0 = time.perf_counter()
            loss, seen = run_epoch(
                train_model,
                loader,
                step,
                device,
                ds_cfg,
                progress=rank == 0,
                desc=f"{config['desc']} epoch {epoch}",
            )
            seconds = time.perf_counter() - t0
            loop_seconds += seconds
            losses = _gather((loss, seen), world)
            t1 = time.perf_counter()
            eval_model.eval()
            preds = _sharded_val(
                eval_model, tokenizer, val_rows, task, cfg.max_length, cfg.batch_size * 2, device, rank, world
            )
            val = task.metrics(preds, golds_of(val_rows, task))
            score = primary_value(val, task)  # identical on every rank: all saw the same predictions
            history.append(
                {
                    "epoch": epoch,
                    "train_loss": float(np.mean([x[0] for x in losses])),
                    "val": val,
                    "seconds": seconds,
                    "val_seconds": time.perf_counter() - t1,
                    "samples_per_worker": [x[1] for x in losses],
                }
            )
            if score > best:  # ties keep the earlier epoch
                best, best_epoch = score, epoch
                state = state_for_save()  # ZeRO-3: a collective, so every rank calls it
                if rank == 0:
                    shutil.rmtree(best_dir, ignore_errors=True)
                    state = {k: v.detach().float().cpu() for k, v in state.items()}  # always fp32 on disk
                    module.save_pretrained(best_dir, state_dict=state)
                    tokenizer.save_pretrained(best_dir)
                    write_meta(
                        best_dir,
                        kind="finetune",
                        task_type=task.type,
                        labels=task.labels,
                        max_length=cfg.max_length,
                        base_model=config["model_path"],
                        epoch=epoch,
                        val_metrics=val,
                        strategy=cfg.strategy,
                    )
                del state
            ray.train.report(
                {"epoch": epoch, "score": score, "best_epoch": best_epoch, "train_loop_seconds": loop_seconds}
            )
        summary = {
            "best_epoch": best_epoch,
            "history_json": json.dumps(history),
            "train_loop_seconds": loop_seconds,
            "worker_enter_unix": t_enter,
            "worker_setup_seconds": t_ready - t_enter,
            "worker_done_unix": time.time(),
        }
        checkpoint = ray.train.Checkpoint.from_directory(str(best_dir)) if rank == 0 else None
        ray.train.report(summary, checkpoint=checkpoint)
    if dist.is_initialized():
        dist.barrier()


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

    avail = ray.available_resources().get("CPU", 1.0)
    if len([n for n in ray.nodes() if n.get("Alive")]) == 1:
        avail = min(avail, os.cpu_count() or 1)
    return max(1, int(avail // cfg.num_workers))


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

    t_start, t_start_unix = time.perf_counter(), time.time()
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code)
    features = train_features(tokenizer, train_rows, task, cfg.max_length)
    data_ref = ray.put({"features": features, "val_rows": val_rows})
    threads = _cpus_per_worker(cfg)
    trainer = TorchTrainer(
        _train_loop,
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


# ------------------------------------------------------------------------------- embedding-head student


def _fit_embedding_head(
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


def _train_embedding_head(
    train_rows, val_rows, task, cfg, model_path, out_dir: Path, seed, desc
) -> StudentResult:
    import ray

    t0 = time.perf_counter()
    threads = _cpus_per_worker(cfg.model_copy(update={"num_workers": 1}))
    remote = ray.remote(num_cpus=threads, num_gpus=1 if cfg.use_gpu else 0)(_fit_embedding_head)
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
