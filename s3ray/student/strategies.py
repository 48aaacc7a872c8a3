"""Data-parallel strategies for the Ray Train worker, behind one small interface: each wraps the model,
its loader and optimiser and returns a `Strategy` (what to run forward on, how to step, what to save).
Runs inside Ray Train workers only, so Ray Train and DeepSpeed are imported there, lazily."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from s3ray.config import StudentConfig
from s3ray.student.optim import make_step


@dataclass
class Strategy:
    train_model: Any  # what the training forward pass runs on (DDP wrapper, DeepSpeed engine)
    eval_model: Any  # what validation runs on (ZeRO-3: the engine, which gathers partitioned weights)
    module: torch.nn.Module  # the bare HF model, for save_pretrained
    loader: Any
    device: torch.device
    step: Callable[[torch.Tensor], None]  # backward + optimiser step + zero_grad
    state_for_save: Callable[[], dict]  # the full state dict (ZeRO-3: a collective, every rank calls it)
    autocast_cfg: StudentConfig  # the config run_epoch's autocast follows
    info: dict = field(default_factory=dict)  # reported with the run's metrics (e.g. the real ZeRO stage)


def ddp(model, loader, opt, sched_fn, cfg: StudentConfig, world: int, device) -> Strategy:
    """PyTorch DDP through Ray Train (plain single-process training when world == 1)."""
    from ray.train.torch import prepare_data_loader, prepare_model  # Ray Train: only inside its workers

    model = prepare_model(model)  # DDP when world > 1, moves to the device
    loader = prepare_data_loader(loader, add_dist_sampler=False)  # our seeded sampler already shards
    module = model.module if hasattr(model, "module") else model
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16" and device.type == "cuda")
    return Strategy(
        train_model=model,
        eval_model=module,
        module=module,
        loader=loader,
        device=device,
        step=make_step(module.parameters(), opt, sched_fn(opt), scaler),
        state_for_save=module.state_dict,
        autocast_cfg=cfg,
        info={"strategy": "ddp"},
    )


def deepspeed(model, loader, opt, sched_fn, cfg: StudentConfig, world: int, device) -> Strategy:
    """DeepSpeed ZeRO (stage cfg.zero_stage); the engine does clipping, mixed precision and the scheduler."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.use_gpu else "cpu")
    import deepspeed as ds  # heavy, and reads DS_ACCELERATOR at import: only in DeepSpeed workers

    config = {
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
    engine, _, _, _ = ds.initialize(model=model, optimizer=opt, lr_scheduler=sched_fn, config=config)

    def step(loss: torch.Tensor) -> None:
        engine.backward(loss)
        engine.step()  # optimiser, scheduler, zero_grad

    def state_for_save() -> dict:
        if engine.zero_optimization_stage() == 3:  # partitioned weights: every rank takes part in gathering
            return engine._zero3_consolidated_16bit_state_dict()
        return engine.module.state_dict()

    return Strategy(
        train_model=engine,
        eval_model=engine,
        module=engine.module,
        loader=loader,
        device=engine.device,
        step=step,
        state_for_save=state_for_save,
        autocast_cfg=cfg.model_copy(update={"mixed_precision": "no"}),  # DeepSpeed casts the model itself
        info={"strategy": "deepspeed", "zero_stage": int(engine.zero_optimization_stage())},
    )


STRATEGIES: dict[str, Callable[..., Strategy]] = {"ddp": ddp, "deepspeed": deepspeed}
