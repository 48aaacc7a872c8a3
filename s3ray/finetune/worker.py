"""The per-worker Ray Train loop of the teacher fine-tune: DeepSpeed (ZeRO 0-3, bf16, optional CPU offload)
around any causal LM, or peft LoRA adapters on it; checkpoints every N optimizer steps (a DeepSpeed
checkpoint reported to Ray Train, so an interrupted run resumes from it); at the end the exported HF folder
is the run's last checkpoint. Only the standard library at module level: Ray Train's controller unpickles
this function and should not pay for importing torch."""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
from pathlib import Path

STATE_FILE = "s3ray_finetune_state.json"


def micro_schedule(n_rows: int, world: int, rank: int, micro_batch: int, epochs: int, seed: int) -> list[list[int]]:
    """This rank's micro-batches (row indices) for all epochs, in order. Every rank gets the same count
    (short shards repeat rows: ZeRO-3 gathers weights collectively, so all ranks must step together), and
    the order depends only on (seed, epoch), so a resumed run continues the same sequence."""
    per_rank = math.ceil(n_rows / world)
    out = []
    for epoch in range(epochs):
        order = list(range(n_rows))
        random.Random(f"{seed}/{epoch}").shuffle(order)
        mine = order[rank::world]
        mine += mine[: per_rank - len(mine)] if mine else [0] * per_rank
        out += [mine[i : i + micro_batch] for i in range(0, per_rank, micro_batch)]
    return out


def _collate(rows: list[dict], pad_id: int):
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return ids, labels, mask


def _mean_over_ranks(loss: float, tokens: int, world: int) -> dict:
    """The step's loss averaged over ranks and its tokens summed (every rank calls this)."""
    import torch
    import torch.distributed as dist

    v = torch.tensor([loss, float(tokens)], dtype=torch.float64)
    if world > 1 and dist.is_initialized():
        dist.all_reduce(v)
    return {"loss": float(v[0]) / world, "tokens": int(v[1])}


def _build_model(config: dict, ds_config: dict):
    """The model, with ZeRO-3 partitioning at load (transformers' HfDeepSpeedConfig: a 20B model never
    exists whole in one process), activation checkpointing, and LoRA adapters when asked."""
    import torch
    from transformers import AutoModelForCausalLM

    t = config["training"]
    keep_alive = None
    if t["zero_stage"] == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)  # must outlive from_pretrained
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t["dtype"], torch.float32)
    model = AutoModelForCausalLM.from_pretrained(config["model_path"], dtype=dtype, trust_remote_code=False)
    model.config.use_cache = False
    if t["activation_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if t["method"] == "lora":
        from peft import LoraConfig, get_peft_model

        lo = config["lora"]
        model = get_peft_model(model, LoraConfig(
            r=lo["rank"], lora_alpha=lo["alpha"], lora_dropout=lo["dropout"], task_type="CAUSAL_LM",
            target_modules=lo["target_modules"]))
    return model, keep_alive


def _optimizer(model, config: dict, ds_config: dict):
    """torch AdamW, or DeepSpeed's CPU Adam (named in the DeepSpeed config) when states are offloaded."""
    import torch

    t = config["training"]
    params = [p for p in model.parameters() if p.requires_grad]
    if t["offload_optimizer"]:
        ds_config["optimizer"] = {"type": "AdamW", "params": {"lr": t["learning_rate"], "weight_decay": 0.0}}
        return None, params
    return torch.optim.AdamW(params, lr=t["learning_rate"], weight_decay=0.0), params


def _save(engine, step: int, history: list, rank: int) -> None:
    """A DeepSpeed checkpoint (every rank writes its shards) plus the loop state, reported to Ray Train."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="s3ray-ft-ckpt-") as d:
        engine.save_checkpoint(d, tag="state")
        if rank == 0:
            Path(d, STATE_FILE).write_text(json.dumps({"step": step, "history": history}))
        ray.train.report({"step": step, "loss": history[-1]["loss"] if history else float("nan")},
                         checkpoint=ray.train.Checkpoint.from_directory(d))


def _restore(engine) -> tuple[int, list]:
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0, []
    with ckpt.as_directory() as d:
        state_file = Path(d, STATE_FILE)
        if not state_file.is_file():  # the run's last checkpoint is already the export: nothing to train
            return -1, []
        # DeepSpeed's own checkpoint files, written by this run into its own run directory.
        engine.load_checkpoint(d, tag="state")
        state = json.loads(state_file.read_text())
    return int(state["step"]), state["history"]


def train_loop(config: dict) -> None:
    """Runs in every Ray Train worker."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if config["training"]["use_gpu"] else "cpu")
    import deepspeed
    import ray
    import ray.train
    import torch

    from s3ray.finetune.export import export_from_worker

    t = config["training"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    torch.manual_seed(config["seed"])  # LoRA adapters' initial weights
    rows = ray.get(config["data_ref"])
    # Ray Train already set up torch.distributed; DeepSpeed's own comm layer must see it before the ZeRO-3
    # config (HfDeepSpeedConfig) is read, or that config counts a world of 1.
    deepspeed.init_distributed(dist_backend="nccl" if t["use_gpu"] else "gloo")
    ds_config = dict(config["ds_config"])
    model, keep_alive = _build_model(config, ds_config)
    opt, params = _optimizer(model, config, ds_config)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, model_parameters=params, config=ds_config)
    step, history = _restore(engine)
    schedule = micro_schedule(len(rows), world, rank, t["micro_batch"], t["epochs"], config["seed"])
    total = len(schedule) // t["grad_accum"]
    if t["max_steps"]:
        total = min(total, t["max_steps"])
    stop_at = min(total, config["stop_after_steps"] or total)
    engine.train()
    pad_id = config["pad_id"]
    window, tokens, t0 = [], 0, time.perf_counter()
    while 0 <= step < stop_at:
        for k in range(t["grad_accum"]):
            batch = schedule[step * t["grad_accum"] + k]
            ids, labels, mask = (x.to(engine.device) for x in _collate([rows[i] for i in batch], pad_id))
            loss = engine(input_ids=ids, attention_mask=mask, labels=labels).loss
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            window.append(float(loss.detach()))
            tokens += int(mask.sum())
        step += 1
        history.append({"step": step, "seconds": time.perf_counter() - t0,
                        **_mean_over_ranks(sum(window) / len(window), tokens, world)})
        window, tokens, t0 = [], 0, time.perf_counter()
        if step % t["checkpoint_every"] == 0 or step == stop_at:
            _save(engine, step, history, rank)
    if step == total:
        export_from_worker(engine, config, rank, history)
    del keep_alive
