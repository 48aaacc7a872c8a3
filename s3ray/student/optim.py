"""The optimiser, its step and autocast: one definition for Ray Train's DDP workers, the embedding-head
student and the plain-PyTorch benchmark loop (DeepSpeed steps its own engine, see strategies.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from transformers import get_linear_schedule_with_warmup

from s3ray.config import StudentConfig


def make_optimizer(model: torch.nn.Module, cfg: StudentConfig, total_steps: int, lr: float | None = None):
    """AdamW without weight decay on biases and norms, and a linear warm-up then linear decay. Returns the
    optimiser and a function building the scheduler (DeepSpeed wants to build it around its own optimiser)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr or cfg.learning_rate,
    )
    warmup = int(cfg.warmup_ratio * total_steps)
    return opt, (lambda o: get_linear_schedule_with_warmup(o, warmup, total_steps))


def make_step(
    params: Iterable[torch.nn.Parameter],
    opt: torch.optim.Optimizer,
    sched,
    scaler: torch.amp.GradScaler | None = None,
    clip: float | None = 1.0,
) -> Callable[[torch.Tensor], None]:
    """`step(loss)`: backward (loss scaled when fp16 asks for it), optional gradient clipping, optimiser and
    scheduler step, zero the gradients."""
    params = list(params)
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)  # disabled: plain backward and step

    def step(loss: torch.Tensor) -> None:
        scaler.scale(loss).backward()
        if clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, clip)
        scaler.step(opt)
        scaler.update()
        sched.step()
        opt.zero_grad(set_to_none=True)

    return step


def autocast_for(cfg: StudentConfig, device: torch.device):
    if cfg.mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
