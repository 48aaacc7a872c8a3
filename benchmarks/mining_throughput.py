"""Error-mining throughput: the Ray Data pipeline (`mine_errors`) vs a plain batched loop.

Both run the same `StudentPredictor` over the same rows and end with the same things in hand (predictions,
the error rows, accuracy / macro F1). Both clocks include loading the model. The Ray side also writes
predictions and errors to Parquet and merges per-block metric summaries; the plain side keeps everything in
memory. Ray itself is started before either clock starts, and each side first runs once on a few batches
(the plain loop in this process, the Ray pipeline on the cluster: Ray Data's own per-cluster actors start
then, as they would have in any earlier round of an S3 run). The Ray side still starts a fresh inference
actor inside its clock, which imports torch and loads the student.

Two ratios per concurrency: `ray_data_over_plain` (end to end, rows / clock) and `in_loop_over_plain`
(rows / time from the first batch's start to the last batch's end, both sides timed the same way), so the
fixed start-up cost and the per-row cost can be read apart.

Default student: the embedded MiniLM (`embedded:all-minilm-l6-v2`) saved as a 2-label SST-2 classifier
(random head: speed does not depend on the weights), rows from data/sst2/test.jsonl repeated to `--rows`.

    python benchmarks/mining_throughput.py --rows 20000 --concurrency 1 auto
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
    from s3ray.tasks.classification import ClassificationTask

    src = resolve_student(model_spec)
    torch.manual_seed(0)
    model = ClassificationTask(labels=LABELS).student_head().build(src)
    model.save_pretrained(dest, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(dest)
    write_meta(dest, kind="finetune", task_type="classification", labels=LABELS, max_length=max_length,
               base_model=model_spec)
    return dest


def make_rows(n: int) -> list[dict]:
    with open(REPO / "data" / "sst2" / "test.jsonl") as f:
        src = [json.loads(line) for line in f if line.strip()]
    return [{"id": f"{i}", "text": src[i % len(src)]["text"], "label": src[i % len(src)]["label"]} for i in range(n)]


def timed_predictor(log_path: Path):
    """StudentPredictor that appends each batch's (start, end, rows) in wall-clock time to `log_path`;
    the class travels to Ray actors by value, with the path in it."""
    from s3ray.student.predict import StudentPredictor

    class TimedPredictor(StudentPredictor):
        def __call__(self, batch):
            start = time.time()
            out = super().__call__(batch)
            with open(log_path, "a") as f:
                f.write(json.dumps({"start": start, "end": time.time(), "rows": len(out["margin"]),
                                    "pid": os.getpid()}) + "\n")
            return out

    return TimedPredictor


def batch_timing(log_path: Path, clock_start: float) -> dict:
    """Start-up (clock start -> first batch), in-loop rows/s (first batch start -> last batch end), and how
    many processes ran batches (the actors that actually worked)."""
    events = [json.loads(line) for line in log_path.read_text().splitlines()]
    first, last = min(e["start"] for e in events), max(e["end"] for e in events)
    rows = sum(e["rows"] for e in events)
    return {"startup_s": first - clock_start, "in_loop_s": last - first, "in_loop_rows_per_s": rows / (last - first),
            "processes": len({e["pid"] for e in events})}


def plain_loop(checkpoint: Path, rows: list[dict], batch_size: int, task, log_path: Path) -> dict:
    import numpy as np
    from tqdm.auto import tqdm

    log_path.unlink(missing_ok=True)
    wall0, t0 = time.time(), time.perf_counter()
    pred = timed_predictor(log_path)(str(checkpoint), batch_size=batch_size, device="cpu")
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
    return {"seconds": secs, "rows_per_s": len(rows) / secs, "n_errors": len(errors), "metrics": metrics,
            **batch_timing(log_path, wall0)}


def ray_pipeline(checkpoint: Path, val_path: Path, out_dir: Path, batch_size: int, concurrency: int, task,
                 log_path: Path) -> dict:
    from s3ray.config import MiningConfig, StudentConfig
    from s3ray.mining import mine_errors

    log_path.unlink(missing_ok=True)
    wall0, t0 = time.time(), time.perf_counter()
    r = mine_errors(str(checkpoint), str(val_path), task, StudentConfig(),
                    MiningConfig(batch_size=batch_size, concurrency=concurrency), out_dir,
                    predictor_cls=timed_predictor(log_path))
    secs = time.perf_counter() - t0
    return {"seconds": secs, "rows_per_s": r.n_rows / secs, "n_errors": r.n_errors, "metrics": r.metrics,
            **batch_timing(log_path, wall0)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--concurrency", nargs="+", default=["1", "auto"],
                    help="inference actor counts to run, or 'auto' (s3ray's default: one per core here)")
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
    warm = work / "warm.parquet"
    pd.DataFrame(rows[: args.batch_size * 2]).to_parquet(warm, index=False)
    timings = work / "batches.jsonl"

    init_ray(num_cpus=args.num_cpus, temp_dir=str(work / "ray"))
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False  # identical rows; keep the log readable

    # Warm-up on a few batches (file cache, lazy imports in this process; Ray Data's per-cluster actors)
    # so neither side pays first-use costs alone.
    plain_loop(ckpt, rows[: args.batch_size * 2], args.batch_size, task, timings)
    ray_pipeline(ckpt, warm, work / "out-warm", args.batch_size, 1, task, timings)
    def run_plain(when: str) -> dict:
        p = plain_loop(ckpt, rows, args.batch_size, task, timings)
        p["load_avg_1m_after"] = os.getloadavg()[0]  # shared machines: other work skews both clocks
        print(f"plain loop ({when}): {p['rows_per_s']:.1f} rows/s ({p['seconds']:.1f}s, start-up "
              f"{p['startup_s']:.1f}s, in loop {p['in_loop_rows_per_s']:.1f} rows/s)", flush=True)
        return p

    from s3ray.mining.mine import inference_pool

    # The plain loop runs before and after the Ray runs and the ratios use the mean of the two, so a slow
    # spell on a shared machine shows up as a gap between them rather than as a skewed ratio.
    before = run_plain("before")
    runs = {}
    for c in args.concurrency:
        c = c if c == "auto" else int(c)
        actors = inference_pool(False, c)["compute"].max_size  # what the pipeline will ask for
        r = ray_pipeline(ckpt, val, work / f"out-c{c}", args.batch_size, c, task, timings)
        r["actors"] = actors
        assert r["n_errors"] == before["n_errors"], (r["n_errors"], before["n_errors"])
        r["load_avg_1m_after"] = os.getloadavg()[0]
        runs[f"concurrency_{c}"] = r
        print(f"ray data, concurrency {c} ({r['actors']} actors, {r['processes']} ran batches): "
              f"{r['rows_per_s']:.1f} rows/s ({r['seconds']:.1f}s, start-up {r['startup_s']:.1f}s, "
              f"in loop {r['in_loop_rows_per_s']:.1f} rows/s)", flush=True)
    after = run_plain("after")
    plain = {key: (before[key] + after[key]) / 2 for key in ("rows_per_s", "in_loop_rows_per_s", "seconds")}
    plain.update(before=before, after=after, metrics=before["metrics"], n_errors=before["n_errors"])
    for c, r in runs.items():
        r["ray_data_over_plain"] = r["rows_per_s"] / plain["rows_per_s"]
        r["in_loop_over_plain"] = r["in_loop_rows_per_s"] / plain["in_loop_rows_per_s"]
        print(f"{c}: ray_data_over_plain = {r['ray_data_over_plain']:.3f}, "
              f"in_loop_over_plain = {r['in_loop_over_plain']:.3f}", flush=True)
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
        "in_loop_over_plain": {k: v["in_loop_over_plain"] for k, v in runs.items()},
        "note": "plain: mean of a run before and one after the Ray runs. Both clocks include model load (the "
        "Ray side: a fresh actor process importing torch); the Ray side also writes predictions/errors Parquet "
        "and merges per-block metric summaries. Same predictor, rows and batch size. Both sides warmed up on a "
        "few batches first. in_loop: first batch start to last batch end.",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({"ray_data_over_plain": result["ray_data_over_plain"],
                      "in_loop_over_plain": result["in_loop_over_plain"]}))
    return result


if __name__ == "__main__":
    main()
