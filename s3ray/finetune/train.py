"""Driver of the teacher fine-tune: check the plan, tokenise once, run the Ray Train loop (worker.py), copy
the exported folder to `out_dir/export`.

Resume: the Ray Train run has a fixed name under `out_dir/ray_train`, and Ray Train restores a run with the
same name and storage from its latest checkpoint, so calling this again after an interruption continues
from the last saved step (same data order, same loss history).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from s3ray.config import ConfigError
from s3ray.finetune.config import FinetuneConfig, deepspeed_config, model_dir, require_fit
from s3ray.finetune.formats import encode_all, training_pairs
from s3ray.tasks.base import Task

log = logging.getLogger("s3ray.finetune")
RUN_NAME = "teacher-finetune"


@dataclass
class FinetuneResult:
    export_dir: str | None  # HF folder (or LoRA adapter folder); None when stopped early
    steps: int
    total_steps: int
    history: list[dict]  # per optimizer step: step, loss, tokens, seconds
    n_examples: int
    dropped_too_long: int
    wall_seconds: float
    extra: dict = field(default_factory=dict)


def check_can_train(cfg: FinetuneConfig) -> None:
    """Config problems that stop a fine-tune, raised before anything starts (the memory plan included)."""
    if not cfg.model.path:
        raise ConfigError("model.path: a local HF causal-LM folder is needed to fine-tune (preset is --plan only)")
    if cfg.training.method == "lora":
        try:
            import peft  # noqa: F401 - only checks that LoRA can run before any worker starts
        except ImportError:
            raise ConfigError("training.method=lora needs the peft package (pip install peft)") from None
    require_fit(cfg)


def _threads(workers: int) -> int:
    import ray

    from s3ray.runtime import cap_to_local_cores

    return max(1, int(cap_to_local_cores(ray.available_resources().get("CPU", 1.0)) // workers))


def require_shared_output_dir(out_dir: str | Path) -> None:
    """On a cluster of several nodes, prove every node sees the fine-tune's run directory (checkpoints, export)
    before anything runs there; one node needs nothing. Ray must be initialised."""
    from s3ray.runtime import alive_nodes
    from s3ray.storage import check_visible_from_all_nodes

    if len(alive_nodes()) > 1:
        check_visible_from_all_nodes(str(out_dir), fix="set run.output_dir to a shared filesystem mounted at the "
                                     "same path on every node (NFS, EFS, Filestore).")


def finetune_teacher(
    cfg: FinetuneConfig,
    rows: list[dict],
    task: Task,
    out_dir: str | Path,
    resume: bool = False,
    stop_after_steps: int | None = None,
) -> FinetuneResult:
    """Fine-tune cfg.model.path on `rows` (task rows with labels) and export it to out_dir/export."""
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from transformers import AutoTokenizer

    from s3ray.finetune.worker import train_loop
    from s3ray.runtime import fit_keeping_ctrl_c, init_ray

    check_can_train(cfg)
    plan, text = require_fit(cfg)
    log.info("memory plan:\n%s", text)
    out_dir = Path(out_dir).resolve()
    storage = out_dir / "ray_train"
    if storage.exists() and not resume:
        shutil.rmtree(storage)  # a fresh fine-tune: Ray Train would otherwise restore the old run
    t0 = time.perf_counter()
    path = model_dir(cfg)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    encoded, dropped = encode_all(tok, training_pairs(task, rows, cfg.training.format), cfg.training.seq_len)
    if not encoded:
        raise ConfigError(f"no training example fits training.seq_len={cfg.training.seq_len}; raise it")
    if dropped:
        log.warning("%d of %d examples dropped: completion longer than training.seq_len", dropped, len(encoded))
    if not ray.is_initialized():
        init_ray(cfg.ray.address, cfg.ray.num_cpus)
    require_shared_output_dir(out_dir)  # workers on other nodes write checkpoints here
    workers = cfg.workers
    threads = _threads(workers)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "training": cfg.training.model_dump(), "lora": cfg.lora.model_dump(),
            "ds_config": deepspeed_config(cfg, workers), "model_path": path,
            "data_ref": ray.put(encoded), "pad_id": tok.pad_token_id if tok.pad_token_id is not None else 0,
            "seed": cfg.run.seed, "threads": threads, "stop_after_steps": stop_after_steps,
            "task_meta": {"type": task.type, "labels": task.labels, "description": task.description},
        },
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=cfg.training.use_gpu,
                                     resources_per_worker={"CPU": threads}),
        run_config=RunConfig(name=RUN_NAME, storage_path=str(storage),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    log.info("fine-tuning %s on %d examples: %d worker(s) x %d CPU, %s, ZeRO-%d",
             path, len(encoded), workers, threads, cfg.training.method, cfg.training.zero_stage)
    result = fit_keeping_ctrl_c(trainer)
    if getattr(result, "error", None):
        raise RuntimeError("teacher fine-tune: Ray Train failed") from result.error
    return _collect(result, out_dir, len(encoded), dropped, time.perf_counter() - t0, plan)


def _collect(result, out_dir: Path, n: int, dropped: int, wall: float, plan) -> FinetuneResult:
    from s3ray.finetune.export import read_meta
    from s3ray.finetune.worker import STATE_FILE

    if result.checkpoint is None:
        raise RuntimeError("teacher fine-tune finished without a checkpoint (see the worker logs)")
    dest = out_dir / "export"
    with result.checkpoint.as_directory() as src:
        state = Path(src) / STATE_FILE
        if state.is_file():  # stopped early: the last checkpoint is a training state, not an export
            import json

            s = json.loads(state.read_text())
            return FinetuneResult(None, s["step"], -1, s["history"], n, dropped, wall)
        tmp = out_dir / "export.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    meta = read_meta(dest)
    history = meta.get("history", [])
    steps = history[-1]["step"] if history else 0
    return FinetuneResult(str(dest), steps, steps, history, n, dropped, wall,
                          extra={"plan_gpu_gib": plan.gpu["total"] / 2**30, "ray_run": str(result.path)})
