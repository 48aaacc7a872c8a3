"""Student training throughput: Ray Train with 1 and 2 workers vs a plain PyTorch loop.

Same rows, model, tokenisation, optimiser and epoch loop (s3ray.student.epochs.run_epoch) in all three; the
plain loop runs in this process without Ray. Throughput is measured inside the training loops (samples/s);
Ray Train's start-up, worker set-up, validation and shut-down are reported separately, with the end-to-end
wall time of each train_student call.

    python benchmarks/student_training.py                      # MiniLM, 512 SST-2 rows, max_length 64
    python benchmarks/student_training.py --model PATH --rows 256

Writes benchmarks/results/student_training.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rows(n_train: int, n_val: int) -> tuple[list[dict], list[dict]]:
    rows = [
        json.loads(line) for line in (REPO / "data" / "sst2" / "validation.jsonl").read_text().splitlines()
    ]
    if n_train + n_val > len(rows):
        raise SystemExit(
            f"--rows {n_train}: data/sst2/validation.jsonl has {len(rows)} rows ({n_val} kept for validation)"
        )
    return rows[:n_train], rows[n_train : n_train + n_val]


def train_plain(train_rows: list[dict], task, cfg, model_path: str, seed: int, threads: int | None = None) -> dict:
    """The same data, model, optimiser and epoch loop as a Ray Train worker, in this process and without
    Ray: the baseline Ray Train is compared against. No validation."""
    import torch
    from transformers import AutoTokenizer

    from s3ray.student.epochs import run_epoch
    from s3ray.student.features import make_loader
    from s3ray.student.optim import make_optimizer, make_step

    if threads:
        torch.set_num_threads(threads)
    head = task.student_head()
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code)
    features = head.features(tokenizer, task.check_student_rows(train_rows, "training rows"), cfg.max_length)
    torch.manual_seed(seed)
    model = head.build(model_path, cfg.trust_remote_code)
    loader, sampler = make_loader(features, tokenizer, cfg.batch_size, seed)
    opt, sched_fn = make_optimizer(model, cfg, len(loader) * cfg.epochs)
    step = make_step(model.parameters(), opt, sched_fn(opt))
    device = torch.device("cuda" if cfg.use_gpu else "cpu")
    model.to(device)
    losses, seconds = [], 0.0
    for epoch in range(1, cfg.epochs + 1):
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        loss, _ = run_epoch(model, loader, step, device, cfg, progress=True, desc=f"plain epoch {epoch}")
        seconds += time.perf_counter() - t0
        losses.append(loss)
    return {"train_seconds": seconds, "n_features": len(features), "losses": losses,
            "samples_per_second": len(features) * cfg.epochs / seconds}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model", default="embedded:all-minilm-l6-v2", help="student model (embedded id or HF folder)"
    )
    ap.add_argument("--rows", type=int, default=512, help="training rows from data/sst2/validation.jsonl")
    ap.add_argument("--val-rows", type=int, default=64, help="validation rows (timed separately)")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16, help="per worker")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--workers", default="1,2", help="Ray Train worker counts to measure")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "student_training.json"))
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="s3bench-student-"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from s3ray.runtime import init_ray, set_cache_dirs

    set_cache_dirs(tmp / "caches")
    from s3ray.config import StudentConfig
    from s3ray.models import resolve_student
    from s3ray.student import train_student
    from s3ray.tasks.classification import ClassificationTask

    model_path = resolve_student(args.model)
    train, val = _rows(args.rows, args.val_rows)
    task = ClassificationTask(labels=["negative", "positive"])
    base = {"epochs": args.epochs, "batch_size": args.batch_size, "max_length": args.max_length}
    cores = os.cpu_count() or 1
    load_at_start = list(os.getloadavg())

    def plain_run() -> dict:
        t0 = time.perf_counter()
        r = train_plain(train, task, StudentConfig(**base), model_path, seed=0, threads=cores)
        r["wall_seconds"] = time.perf_counter() - t0  # model load + tokenisation + loop
        print(f"  plain: {r['samples_per_second']:.2f} samples/s", flush=True)
        return r

    # The machine may be shared: every Ray run is bracketed by plain runs, and compared with their mean.
    print(f"plain PyTorch loop, {cores} threads ...", flush=True)
    plains = [plain_run()]
    init_ray(num_cpus=cores, temp_dir=str(tmp / "ray"))
    ray_runs = {}
    for w in [int(x) for x in args.workers.split(",")]:
        print(f"Ray Train, {w} worker(s) ...", flush=True)
        res = train_student(
            train,
            val,
            task,
            StudentConfig(**base, num_workers=w),
            model_path,
            tmp / f"ray{w}",
            seed=0,
            desc=f"bench-{w}w",
        )
        print(f"  ray {w}w: {res.samples_per_second:.2f} samples/s", flush=True)
        plains.append(plain_run())
        ref = plains[-2:]
        ray_runs[w] = {
            "samples_per_second": res.samples_per_second,
            "train_seconds": res.train_seconds,
            "wall_seconds": res.wall_seconds,
            "cpus_per_worker": res.extra["cpus_per_worker"],
            "ray_start_seconds": res.extra["ray_start_seconds"],
            "worker_setup_seconds": res.extra["worker_setup_seconds"],
            "val_seconds": res.extra["val_seconds"],
            "ray_finish_seconds": res.extra["ray_finish_seconds"],
            "driver_prep_seconds": res.extra["driver_prep_seconds"],
            "train_loss": [h["train_loss"] for h in res.history],
            "plain_reference_samples_per_second": sum(p["samples_per_second"] for p in ref) / 2,
            "plain_reference_wall_seconds": sum(p["wall_seconds"] for p in ref) / 2,
        }

    out = {
        "benchmark": "student_training",
        "model": args.model,
        "rows": args.rows,
        "max_length": args.max_length,
        "batch_size_per_worker": args.batch_size,
        "epochs": args.epochs,
        "machine": {
            "cores": cores,
            "python": platform.python_version(),
            "load_average_at_start": load_at_start,
            "load_average_at_end": list(os.getloadavg()),
        },
        "plain": {
            "threads": cores,
            "samples_per_second_runs": [p["samples_per_second"] for p in plains],
            "train_seconds_runs": [p["train_seconds"] for p in plains],
            "wall_seconds_runs": [p["wall_seconds"] for p in plains],
            "train_loss": plains[0]["losses"],
        },
        "ray": {f"{w}_workers": r for w, r in ray_runs.items()},
    }
    for w, r in ray_runs.items():
        out[f"ray{w}_over_plain"] = r["samples_per_second"] / r["plain_reference_samples_per_second"]
        out[f"ray{w}_over_plain_end_to_end"] = r["plain_reference_wall_seconds"] / r["wall_seconds"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    for w in ray_runs:
        print(
            f"ray{w}_over_plain = {out[f'ray{w}_over_plain']:.3f} (in-loop samples/s); "
            f"end to end {out[f'ray{w}_over_plain_end_to_end']:.3f}"
        )
    print(f"wrote {args.out}")
    import ray

    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
