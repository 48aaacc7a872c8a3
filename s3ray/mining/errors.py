"""Step 4 of S3: run the student over the real validation set and collect what it gets wrong.

One streaming Ray Data pipeline, so the validation set may be far larger than the driver's memory:

    read (Parquet / JSONL / CSV)  ->  map_batches(StudentPredictor actors)  ->  write predictions Parquet

Everything after that reads the predictions back from Parquet (inference runs once) and only ever brings
small aggregates to the driver: errors are a filter written straight to Parquet, hard examples a distributed
sort + limit, and the metrics come from Ray Data aggregations (a label x prediction count table for
accuracy / macro F1; means of exact match and F1 for QA).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from s3ray.tasks.base import Task

log = logging.getLogger("s3ray.mining")

# Columns the predictor adds to every row.
PREDICTION_COLUMNS = ("prediction", "margin", "correct")
ROWS_PER_BLOCK_BATCHES = 4  # inference batches per block


@dataclass
class MiningResult:
    errors_path: str  # Parquet folder: errors (+ hard examples), original columns + prediction, margin, correct, kind
    predictions_path: str  # Parquet folder: every validation row with prediction / margin / correct
    n_rows: int
    n_errors: int
    n_hard: int
    metrics: dict  # task metric on the validation set (accuracy / macro_f1, or exact_match / f1), plus n
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


# --- reading -------------------------------------------------------------------------------------------

def read_rows(path: str | Path):
    """A Ray Dataset over a Parquet / JSONL (optionally .gz) / CSV file or a folder of them."""
    import ray.data

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"validation set {p} does not exist (data.validation in the run config)")
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    names = [f.name.lower() for f in files if not f.name.startswith((".", "_"))]
    if not names:
        raise ValueError(f"validation set folder {p} holds no data files")
    if all(n.endswith(".parquet") for n in names):
        return ray.data.read_parquet(str(p))
    if all(n.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")) for n in names):
        return ray.data.read_json(str(p), lines=True)
    if all(n.endswith((".csv", ".csv.gz")) for n in names):
        return ray.data.read_csv(str(p))
    raise ValueError(
        f"validation set {p}: expected Parquet, JSONL (.jsonl/.jsonl.gz) or CSV files, found {sorted(set(names))[:5]}"
    )


# --- small batch functions (run in Ray tasks, never on the driver) ---------------------------------------

def _keep(batch: pa.Table, correct: bool) -> pa.Table:
    mask = pc.equal(batch["correct"], pa.scalar(correct))
    return batch.filter(pc.fill_null(mask, False))


def _with_kind(batch: pa.Table, kind: str) -> pa.Table:
    return batch.append_column("kind", pa.array([kind] * batch.num_rows, pa.string()))


# --- metrics from aggregations -------------------------------------------------------------------------

def macro_f1_from_counts(counts: dict[tuple[str, str], int], labels: list[str] | None) -> dict[str, float]:
    """Accuracy and macro F1 from a (gold, prediction) -> count table (same result as
    `accuracy_and_macro_f1` over the rows, without the rows)."""
    n = sum(counts.values())
    if n == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "n": 0}
    labels = list(labels) if labels else sorted({g for g, _ in counts})
    correct = sum(c for (g, p), c in counts.items() if g == p)
    f1s = []
    for lab in labels:
        tp = counts.get((lab, lab), 0)
        fp = sum(c for (g, p), c in counts.items() if p == lab and g != lab)
        fn = sum(c for (g, p), c in counts.items() if g == lab and p != lab)
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": correct / n, "macro_f1": sum(f1s) / len(f1s), "n": n}


def _pair_key(batch: pa.Table) -> pa.Table:
    """One "gold<SEP>prediction" string per row, for a distributed value count (the confusion table)."""
    gold = pc.cast(batch["label"], pa.string())
    pred = pc.cast(batch["prediction"], pa.string())
    keys = pc.binary_join_element_wise(gold, pred, _SEP)
    return pa.table({"pair": keys, "correct": batch["correct"]})


_SEP = "\x1f"  # joins gold and prediction into one key; never part of a label name


def _aggregate(preds, task: Task) -> tuple[int, int, dict[str, float]]:
    """(rows, correct rows, task metrics) in one distributed pass over the predictions."""
    from ray.data.aggregate import Count, Mean, Sum, ValueCounter

    if task.type == "extractive_qa":
        # The predictor's QA `correct` is SQuAD exact match and `f1` its token F1 (s3ray.tasks.qa).
        agg = preds.aggregate(Count(), Sum("correct"), Mean("f1"))
        n = int(agg["count()"])
        metrics = {"exact_match": float("nan"), "f1": float("nan"), "n": 0} if n == 0 else {
            "exact_match": int(agg["sum(correct)"] or 0) / n, "f1": float(agg["mean(f1)"]), "n": n}
    else:
        # Only labels x labels (key, count) pairs come back to the driver.
        pairs = preds.map_batches(_pair_key, batch_format="pyarrow")
        agg = pairs.aggregate(Count(), Sum("correct"), ValueCounter("pair", alias_name="confusion"))
        n = int(agg["count()"])
        conf = agg["confusion"] or {"values": [], "counts": []}
        counts = {tuple(v.split(_SEP, 1)): int(c) for v, c in zip(conf["values"], conf["counts"])}
        metrics = macro_f1_from_counts(counts, task.labels)
    return n, int(agg["sum(correct)"] or 0), metrics


# --- the pipeline --------------------------------------------------------------------------------------

def _parquet_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.parquet"))


def _ensure_schema_file(folder: Path, schema: pa.Schema) -> None:
    """An empty result still gets one (empty) Parquet file, so readers see the columns, not a missing path."""
    folder.mkdir(parents=True, exist_ok=True)
    if not _parquet_files(folder):
        pq.write_table(schema.empty_table(), folder / "empty.parquet")


def mine_errors(
    checkpoint: str,
    validation_path: str,
    task: Task,
    student_cfg,
    mining_cfg,
    out_dir: str | Path,
    predictor_cls: type | None = None,
) -> MiningResult:
    """Predict every validation row with the student at `checkpoint`, write predictions and errors to Parquet
    under `out_dir` ("predictions/", "errors/"), and return counts and the task metric.

    `predictor_cls` defaults to `s3ray.student.predict.StudentPredictor` (a callable class over numpy
    batches that adds prediction / margin / correct). Ray must already be initialised.
    """
    import ray.data

    if predictor_cls is None:
        from s3ray.student.predict import StudentPredictor as predictor_cls

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    pred_dir, err_dir = out_dir / "predictions", out_dir / "errors"
    for d in (pred_dir, err_dir):
        shutil.rmtree(d, ignore_errors=True)  # a re-run of a round replaces, never appends

    use_gpu = bool(student_cfg.use_gpu)
    # Small blocks (a few batches each) so every inference actor gets work and writing overlaps inference,
    # even when the whole set is one file; this re-blocking streams (no shuffle, no barrier).
    ds = read_rows(validation_path).repartition(target_num_rows_per_block=ROWS_PER_BLOCK_BATCHES * mining_cfg.batch_size)
    ds = ds.map_batches(
        predictor_cls,
        fn_constructor_kwargs={
            "checkpoint": str(checkpoint),
            "batch_size": mining_cfg.batch_size,
            "device": "cuda" if use_gpu else "cpu",
        },
        batch_size=mining_cfg.batch_size,
        batch_format="numpy",
        concurrency=mining_cfg.concurrency,
        num_gpus=1 if use_gpu else None,
    )
    log.info("mining errors: %s over %s", checkpoint, validation_path)
    ds.write_parquet(str(pred_dir))  # streams: inference and writing overlap, block by block

    # From here on, everything reads the predictions back; inference is not repeated.
    preds = ray.data.read_parquet(str(pred_dir))
    schema = preds.schema().base_schema
    needed = ["correct", "margin", "prediction"] + (["f1"] if task.type == "extractive_qa" else [])
    missing = [c for c in needed if c not in schema.names]
    if missing:
        gold = "answer" if task.type == "extractive_qa" else "label"
        raise ValueError(
            f"{predictor_cls.__name__} returned no {missing} columns (got {schema.names}); the validation "
            f"rows need their gold column {gold!r}"
        )

    errors = preds.map_batches(_keep, fn_kwargs={"correct": False}, batch_format="pyarrow")
    errors = errors.map_batches(_with_kind, fn_kwargs={"kind": "error"}, batch_format="pyarrow")
    if mining_cfg.hard_examples > 0:
        # Distributed sort + limit: the correct rows the student was least sure about.
        hard = preds.map_batches(_keep, fn_kwargs={"correct": True}, batch_format="pyarrow")
        hard = hard.sort("margin").limit(mining_cfg.hard_examples)
        hard = hard.map_batches(_with_kind, fn_kwargs={"kind": "hard"}, batch_format="pyarrow")
        errors = errors.union(hard)
    errors.write_parquet(str(err_dir))
    _ensure_schema_file(err_dir, schema.append(pa.field("kind", pa.string())))

    n_rows, n_correct, metrics = _aggregate(preds, task)
    result = MiningResult(
        errors_path=str(err_dir),
        predictions_path=str(pred_dir),
        n_rows=n_rows,
        n_errors=n_rows - n_correct,
        n_hard=min(mining_cfg.hard_examples, n_correct),
        metrics=metrics,
        seconds=time.perf_counter() - t0,
    )
    log.info(
        "mined %d errors (+%d hard) of %d rows in %.1fs; %s",
        result.n_errors, result.n_hard, result.n_rows, result.seconds, metrics,
    )
    return result
