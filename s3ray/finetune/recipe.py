"""The chained run: plan -> fine-tune -> export -> annotate or generate -> report, each step recorded in
the run directory's manifest so `--resume` skips what finished (and the fine-tune resumes from its last
Ray Train checkpoint)."""

from __future__ import annotations

import json

from s3ray.finetune.config import FinetuneConfig, deepspeed_config, load_finetune_config, require_fit


def print_plan(cfg: FinetuneConfig) -> int:
    from s3ray.finetune.config import plan_for

    plan, text = plan_for(cfg)
    print(text)
    print("DeepSpeed config:")
    print(json.dumps(deepspeed_config(cfg, cfg.hardware.gpus_per_node * cfg.hardware.nodes), indent=2))
    return 0 if plan.fits else 1


def run_from_cli(path: str, overrides: list[str], plan_only: bool = False, resume: bool = False) -> int:
    cfg = load_finetune_config(path, overrides)
    if plan_only:
        return print_plan(cfg)
    require_fit(cfg)
    rep = run_recipe(cfg, resume=resume)
    print(json.dumps(rep, indent=2, default=str))
    return 0


def run_recipe(cfg: FinetuneConfig, resume: bool = False) -> dict:
    raise NotImplementedError
