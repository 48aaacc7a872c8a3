"""The per-worker Ray Train loop. Only the standard library is imported at module level: Ray Train's
controller unpickles `train_loop` too, and should not pay for importing torch, transformers and Ray Train;
so each function imports what it uses (the one reason for imports inside functions in this module)."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path

from s3ray.student.checkpoint import write_meta  # standard library only


def _gather(obj, world: int) -> list:
    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _sharded_predictions(head, model, tokenizer, rows, cfg, device, rank: int, world: int) -> list:
    """Every rank predicts an equal-sized slice (padded with repeats, so all ranks run the same number of
    forward passes: ZeRO-3 gathers weights collectively), then all ranks get all predictions."""
    per = math.ceil(len(rows) / world)
    mine = list(range(rank * per, min(len(rows), (rank + 1) * per)))
    padded = mine + [mine[-1] if mine else 0] * (per - len(mine))
    preds, _ = head.predict(
        model, tokenizer, [rows[i] for i in padded], cfg.max_length, cfg.batch_size * 2, device
    )
    merged: dict[int, object] = {}
    for part in _gather(list(zip(mine, preds[: len(mine)])), world):
        merged.update(part)
    return [merged[i] for i in range(len(rows))]


def _save_best(strategy, tokenizer, dest: Path, config: dict, task, cfg, epoch: int, val: dict, rank: int):
    """The best epoch's HF folder (fp32 safetensors + tokenizer + s3ray meta), written by rank 0."""
    state = strategy.state_for_save()  # ZeRO-3: a collective, so every rank calls it
    if rank != 0:
        return
    shutil.rmtree(dest, ignore_errors=True)
    state = {k: v.detach().float().cpu() for k, v in state.items()}  # always fp32 on disk
    strategy.module.save_pretrained(dest, state_dict=state)
    tokenizer.save_pretrained(dest)
    write_meta(dest, kind="finetune", task_type=task.type, labels=task.labels, max_length=cfg.max_length,
               base_model=config["model_path"], epoch=epoch, val_metrics=val, strategy=cfg.strategy)


def _setup(config: dict):
    """(cfg, task, head, strategy, tokenizer, sampler, rank, world, val_rows) for this worker."""
    # Imported in the worker: Ray Train's controller unpickles this module, which must not pull in torch.
    import ray
    import ray.train
    import torch
    from ray.train.torch import get_device
    from transformers import AutoTokenizer

    from s3ray.config import StudentConfig
    from s3ray.student.features import make_loader
    from s3ray.student.optim import make_optimizer
    from s3ray.student.strategies import STRATEGIES

    cfg = StudentConfig.model_validate(config["cfg"])
    task = config["task"]
    head = task.student_head()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    data = ray.get(config["data_ref"])
    from s3ray.models import on_this_node

    model_path = on_this_node(config["model_path"])  # embedded or staged weights: this node's copy
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code)
    torch.manual_seed(config["seed"])  # the new head's initial weights
    model = head.build(model_path, cfg.trust_remote_code)
    loader, sampler = make_loader(data["features"], tokenizer, cfg.batch_size, config["seed"], rank, world)
    opt, sched_fn = make_optimizer(model, cfg, len(loader) * cfg.epochs)
    strategy = STRATEGIES[cfg.strategy](model, loader, opt, sched_fn, cfg, world, get_device())
    return cfg, task, head, strategy, tokenizer, sampler, rank, world, data["val_rows"]


def train_loop(config: dict) -> None:
    """Runs in every Ray Train worker: build the model, train, validate each epoch, report; rank 0 hands the
    best epoch's folder to Ray Train as the run's checkpoint."""
    t_enter = time.time()
    # Imported in the worker (see _setup).
    import numpy as np
    import ray.train
    import torch.distributed as dist

    from s3ray.student.epochs import best_epoch_loop, run_epoch

    cfg, task, head, strat, tokenizer, sampler, rank, world, val_rows = _setup(config)
    t_ready = time.time()
    loop_seconds = [0.0]

    def train_epoch(epoch: int) -> dict:
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        loss, seen = run_epoch(strat.train_model, strat.loader, strat.step, strat.device, strat.autocast_cfg,
                               progress=rank == 0, desc=f"{config['desc']} epoch {epoch}")
        seconds = time.perf_counter() - t0
        loop_seconds[0] += seconds
        losses = _gather((loss, seen), world)
        return {"train_loss": float(np.mean([x[0] for x in losses])), "seconds": seconds,
                "samples_per_worker": [x[1] for x in losses]}

    def validate() -> dict:
        strat.eval_model.eval()
        preds = _sharded_predictions(head, strat.eval_model, tokenizer, val_rows, cfg, strat.device, rank, world)
        return task.metrics(preds, task.golds(val_rows))  # identical on every rank: same predictions

    def report(epoch: int, score: float, best_epoch: int) -> None:
        ray.train.report({"epoch": epoch, "score": score, "best_epoch": best_epoch,
                          "train_loop_seconds": loop_seconds[0]})

    # Rank 0 keeps the best epoch's HF folder here and hands it to Ray Train once, with the full history:
    # Ray Train V2 keeps only the metrics that come with a checkpoint, and one upload beats one per epoch.
    with tempfile.TemporaryDirectory(prefix="s3ray-best-", ignore_cleanup_errors=True) as keep:
        best_dir = Path(keep) / "best"
        history, best_epoch = best_epoch_loop(
            cfg.epochs, task, train_epoch, validate,
            lambda epoch, val: _save_best(strat, tokenizer, best_dir, config, task, cfg, epoch, val, rank),
            report,
        )
        summary = {
            "best_epoch": best_epoch,
            "history_json": json.dumps(history),
            "train_loop_seconds": loop_seconds[0],
            "worker_enter_unix": t_enter,
            "worker_setup_seconds": t_ready - t_enter,
            "worker_done_unix": time.time(),
            "strategy_json": json.dumps(strat.info),
        }
        checkpoint = ray.train.Checkpoint.from_directory(str(best_dir)) if rank == 0 else None
        ray.train.report(summary, checkpoint=checkpoint)
    if dist.is_initialized():
        dist.barrier()
