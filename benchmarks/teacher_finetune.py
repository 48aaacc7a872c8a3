"""Teacher fine-tune throughput: DeepSpeed ZeRO-2, ZeRO-3 and LoRA (ZeRO-0 around peft) on the same tiny
GPT-NeoX and rows, 2 Ray Train CPU workers each (gloo, DS_ACCELERATOR=cpu).

Throughput is measured inside the training loop (tokens/s and samples/s over the optimizer steps after the
first, which pays for warm-up); start-up (Ray Train, model load, DeepSpeed set-up) is in the wall time.

    python benchmarks/teacher_finetune.py              # ~2-3 min on 2 idle cores
    python benchmarks/teacher_finetune.py --rows 64 --epochs 2

Writes benchmarks/results/teacher_finetune.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tiny model builder the tests use

VARIANTS = {
    "zero2": {"method": "full", "zero_stage": 2},
    "zero3": {"method": "full", "zero_stage": 3},
    "lora": {"method": "lora", "zero_stage": 0},
}


def _one(name: str, model: Path, rows: list[dict], work: Path, args) -> dict:
    from s3ray.config import TaskConfig
    from s3ray.finetune.config import finetune_config_from_dict
    from s3ray.finetune.train import finetune_teacher
    from s3ray.tasks import make_task

    cfg = finetune_config_from_dict({
        "run": {"output_dir": str(work / name)}, "task": {"type": "classification"},
        "model": {"path": str(model)},
        "training": {**VARIANTS[name], "num_workers": 2, "micro_batch": args.micro_batch, "seq_len": 128,
                     "epochs": args.epochs, "checkpoint_every": 10**6, "learning_rate": 1e-3},
    })
    task = make_task(TaskConfig(type="classification"), ["negative", "positive"])
    t0 = time.perf_counter()
    res = finetune_teacher(cfg, rows, task, work / name)
    wall = time.perf_counter() - t0
    timed = res.history[1:] or res.history
    secs = sum(h["seconds"] for h in timed)
    samples = len(timed) * args.micro_batch * 2
    return {"steps": res.steps, "tokens_per_s": sum(h["tokens"] for h in timed) / secs,
            "samples_per_s": samples / secs, "loop_seconds": secs, "wall_seconds": wall,
            "first_loss": res.history[0]["loss"], "last_loss": res.history[-1]["loss"]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "teacher_finetune.json"))
    args = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from finetune_tiny import build_tiny_neox, keyword_rows

    from s3ray.runtime import init_ray, set_cache_dirs

    with tempfile.TemporaryDirectory(prefix="s3ray-bench-ft-") as tmp:
        work = Path(tmp)
        set_cache_dirs(work / "caches")
        init_ray(num_cpus=4, temp_dir=str(work / "ray"))
        model = build_tiny_neox(work / "neox")
        rows = keyword_rows(args.rows)
        results = {name: _one(name, model, rows, work, args) for name in VARIANTS}
    out = {
        "machine": {"platform": platform.platform(), "cores": os.cpu_count()},
        "setup": {"model": "tiny GPT-NeoX (2 layers, hidden 64)", "workers": 2,
                  **{k: v for k, v in vars(args).items() if k != "out"}},
        "results": results,
        "ratios": {"zero3_over_zero2": results["zero3"]["tokens_per_s"] / results["zero2"]["tokens_per_s"],
                   "lora_over_zero2": results["lora"]["tokens_per_s"] / results["zero2"]["tokens_per_s"]},
    }
    print(f"{'variant':<8} {'tokens/s':>10} {'samples/s':>10} {'wall s':>8}")
    for k, v in results.items():
        print(f"{k:<8} {v['tokens_per_s']:>10.1f} {v['samples_per_s']:>10.2f} {v['wall_seconds']:>8.1f}")
    print("ratios:", {k: round(v, 3) for k, v in out["ratios"].items()})
    Path(args.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
