"""Error-mining throughput: the Ray Data pipeline (`mine_errors`) vs a plain batched loop.

Both run the same `StudentPredictor` over the same rows and end with the same things in hand (predictions,
the error rows, accuracy / macro F1). Both clocks include loading the model. The Ray side also writes
predictions and errors to Parquet and computes metrics with Ray Data aggregations; the plain side keeps
everything in memory. Ray itself is started before either clock starts.

Default student: the embedded MiniLM (`embedded:all-minilm-l6-v2`) saved as a 2-label SST-2 classifier
(random head: speed does not depend on the weights), rows from data/sst2/test.jsonl repeated to `--rows`.

    python benchmarks/mining_throughput.py --rows 5000 --concurrency 1 2
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
LABELS = ["negative", "positive"]


def make_checkpoint(model_spec: str, dest: Path, max_length: int) -> Path:
    """The student model saved as an s3ray classification checkpoint (HF folder + s3ray_student.json)."""
    import torch
    from transformers import AutoTokenizer

    from s3ray.models import resolve_student
    from s3ray.student.checkpoint import write_meta
    from s3ray.student.model import build_finetune_model

    src = resolve_student(model_spec)
    torch.manual_seed(0)
    build_finetune_model(src, "classification", LABELS).save_pretrained(dest, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(dest)
    write_meta(dest, kind="finetune", task_type="classification", labels=LABELS, max_length=max_length,
               base_model=model_spec)
    return dest


def make_rows(n: int) -> list[dict]:
    with open(REPO / "data" / "sst2" / "test.jsonl") as f:
        src = [json.loads(line) for line in f if line.strip()]
    return [{"id": f"{i}", "text": src[i % len(src)]["text"], "label": src[i % len(src)]["label"]} for i in range(n)]


def plain_loop(checkpoint: Path, rows: list[dict], batch_size: int, task) -> dict:
    import numpy as np
    from tqdm.auto import tqdm

    from s3ray.student.predict import StudentPredictor

    t0 = time.perf_counter()
    pred = StudentPredictor(str(checkpoint), batch_size=batch_size, device="cpu")
    preds, golds, errors = [], [], []
    for s in tqdm(range(0, len(rows), batch_size), desc="plain loop"):
        chunk = rows[s:s + batch_size]
        batch = {k: np.asarray([r[k] for r in chunk], dtype=object) for k in ("id", "text", "label")}
        out = pred(batch)
        preds += list(out["prediction"])
        golds += list(out["label"])
        errors += [r for r, ok in zip(chunk, out["correct"]) if not ok]
    metrics = task.metrics(preds, golds)
    secs = time.perf_counter() - t0
    return {"seconds": secs, "rows_per_s": len(rows) / secs, "n_errors": len(errors), "metrics": metrics}


def ray_pipeline(checkpoint: Path, val_path: Path, out_dir: Path, batch_size: int, concurrency: int, task) -> dict:
    from s3ray.config import MiningConfig, StudentConfig
    from s3ray.mining import mine_errors

    t0 = time.perf_counter()
    r = mine_errors(str(checkpoint), str(val_path), task, StudentConfig(),
                    MiningConfig(batch_size=batch_size, concurrency=concurrency), out_dir)
    secs = time.perf_counter() - t0
    return {"seconds": secs, "rows_per_s": r.n_rows / secs, "n_errors": r.n_errors, "metrics": r.metrics}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--model", default="embedded:all-minilm-l6-v2")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray cluster (default: all)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "mining_throughput.json"))
    args = ap.parse_args(argv)

    import pandas as pd

    from s3ray.config import TaskConfig
    from s3ray.runtime import init_ray, set_cache_dirs
    from s3ray.tasks import make_task

    work = Path(tempfile.mkdtemp(prefix="s3-mining-bench-"))
    set_cache_dirs(work / "caches")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    task = make_task(TaskConfig(type="classification", description="movie review"), LABELS)
    ckpt = make_checkpoint(args.model, work / "ckpt", args.max_length)
    rows = make_rows(args.rows)
    val = work / "val.parquet"
    pd.DataFrame(rows).to_parquet(val, index=False)

    init_ray(num_cpus=args.num_cpus, temp_dir=str(work / "ray"))
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False  # identical rows; keep the log readable

    # Warm-up (file cache, lazy imports in this process) so neither side pays first-use costs alone.
    plain_loop(ckpt, rows[: args.batch_size * 2], args.batch_size, task)
    plain = plain_loop(ckpt, rows, args.batch_size, task)
    plain["load_avg_1m_after"] = os.getloadavg()[0]  # shared machines: other work skews both clocks
    print(f"plain loop: {plain['rows_per_s']:.1f} rows/s ({plain['seconds']:.1f}s)", flush=True)
    runs = {}
    for c in args.concurrency:
        r = ray_pipeline(ckpt, val, work / f"out-c{c}", args.batch_size, c, task)
        assert r["n_errors"] == plain["n_errors"], (r["n_errors"], plain["n_errors"])
        r["ray_data_over_plain"] = r["rows_per_s"] / plain["rows_per_s"]
        r["load_avg_1m_after"] = os.getloadavg()[0]
        runs[f"concurrency_{c}"] = r
        print(f"ray data, concurrency {c}: {r['rows_per_s']:.1f} rows/s ({r['seconds']:.1f}s); "
              f"ray_data_over_plain = {r['ray_data_over_plain']:.3f}", flush=True)
    ray.shutdown()

    result = {
        "benchmark": "mining_throughput",
        "model": args.model,
        "rows": args.rows,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                    "ray_num_cpus": args.num_cpus},
        "plain": plain,
        "ray_data": runs,
        "ray_data_over_plain": {k: v["ray_data_over_plain"] for k, v in runs.items()},
        "note": "Both clocks include model load; the Ray side also writes predictions/errors Parquet and "
        "computes metrics with Ray Data aggregations. Same predictor, rows and batch size.",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result["ray_data_over_plain"]))
    return result


if __name__ == "__main__":
    main()
