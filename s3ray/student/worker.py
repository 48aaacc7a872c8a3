"""The per-worker Ray Train loop. Only the standard library is imported at module level: Ray Train's
controller unpickles this function too, and should not pay for importing torch and transformers."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path


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
    from s3ray.student.loop import predict_for_metrics

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


def train_loop(config: dict) -> None:
    """Runs in every Ray Train worker: build the model, train, validate each epoch, report; rank 0 hands the
    best epoch's folder to Ray Train as the run's checkpoint."""
    t_enter = time.time()
    import numpy as np
    import ray
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train.torch import get_device, prepare_data_loader, prepare_model
    from transformers import AutoTokenizer

    from s3ray.config import StudentConfig
    from s3ray.student.checkpoint import write_meta
    from s3ray.student.loop import golds_of, make_loader, make_optimizer, primary_value, run_epoch
    from s3ray.student.model import build_finetune_model

    cfg = StudentConfig.model_validate(config["cfg"])
    task = config["task"]
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
