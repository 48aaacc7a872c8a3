"""Step 4 of S3: run the student over the real validation set and collect what it gets wrong.

A streaming Ray Data pipeline, so the validation set may be far larger than the driver's memory:

    1. read (Parquet / JSONL / CSV) -> map_batches(StudentPredictor actors) -> write predictions Parquet
    2. one distributed aggregation over the predictions: row and correct counts, the task metric
       (a gold x prediction count table for accuracy / macro F1; exact match and mean F1 for QA) and the
       k lowest-margin correct rows' (margin, id) keys for the hard examples
    3. one filter pass over the predictions -> errors (+ hard examples) Parquet

Inference runs once (passes 2 and 3 read the predictions back), nothing is sorted or shuffled, and only
small aggregates (label pairs, k keys) ever reach the driver.
"""

from __future__ import annotations

import heapq
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from s3ray.tasks.base import Task

log = logging.getLogger("s3ray.mining")

ROWS_PER_BLOCK_BATCHES = 4  # inference batches per block: enough blocks for every actor, few tasks
_SEP = "\x1f"  # joins gold and prediction into one confusion key; never part of a label name


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


# --- metrics -------------------------------------------------------------------------------------------

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


# --- batch functions (run in Ray tasks, never on the driver) -------------------------------------------

def _row_keys(batch: pa.Table) -> pa.Array:
    """A per-row tie-breaker for the hard-example order: the row id when there is one."""
    if "id" in batch.column_names:
        return pc.cast(batch["id"], pa.string())
    return pa.array([""] * batch.num_rows, pa.string())


def _summary_columns(batch: pa.Table, qa: bool) -> pa.Table:
    """The few columns the aggregation needs (Ray Data then moves only these)."""
    correct = pc.fill_null(batch["correct"], False)
    # One struct column for the hard-example search: Ray Data passes an aggregation only its own column.
    margin_key = pa.StructArray.from_arrays(
        [pc.cast(batch["margin"], pa.float64()), _row_keys(batch)], names=["margin", "key"],
        mask=pc.invert(correct),
    )
    cols = {"correct": correct, "margin_key": margin_key}
    if qa:
        cols["f1"] = batch["f1"]
    else:
        gold = pc.cast(batch["label"], pa.string())
        pred = pc.cast(batch["prediction"], pa.string())
        cols["pair"] = pc.binary_join_element_wise(gold, pred, _SEP)
    return pa.table(cols)


def _select(batch: pa.Table, hard_margin: float | None, hard_key: str | None) -> pa.Table:
    """Errors (kind "error") and the correct rows at or below the hard-example cut (kind "hard")."""
    correct = pc.fill_null(batch["correct"], False)
    wrong = pc.invert(correct)
    if hard_margin is None:
        hard = pa.array([False] * batch.num_rows)
    else:
        m = batch["margin"]
        below = pc.or_(pc.less(m, hard_margin),
                       pc.and_(pc.equal(m, hard_margin), pc.less_equal(_row_keys(batch), hard_key)))
        hard = pc.and_(correct, below)
    keep = pc.or_(wrong, hard)
    kind = pc.if_else(wrong, "error", "hard")
    return batch.append_column("kind", kind).filter(keep)


def _lowest_k_aggregate(k: int):
    """A Ray Data aggregation: the k smallest (margin, key) pairs among correct rows. Each block keeps its
    own k; partial results merge k at a time, so the driver receives k pairs whatever the set's size."""
    from ray.data.aggregate import AggregateFnV2

    class LowestK(AggregateFnV2):
        def __init__(self):
            super().__init__("lowest_k", zero_factory=list, on="margin_key", ignore_nulls=True)

        def aggregate_block(self, block) -> list:
            t = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block)
            col = pc.drop_null(t["margin_key"].combine_chunks() if hasattr(t["margin_key"], "combine_chunks")
                               else t["margin_key"])
            if len(col) == 0:
                return []
            t = pa.table({"margin": col.field("margin"), "key": col.field("key")})
            idx = pc.sort_indices(t, sort_keys=[("margin", "ascending"), ("key", "ascending")])
            t = t.take(idx[:k])
            return list(zip(t["margin"].to_pylist(), t["key"].to_pylist()))

        def combine(self, acc: list, new: list) -> list:
            return heapq.nsmallest(k, [tuple(x) for x in acc] + [tuple(x) for x in new])

    return LowestK()


def _aggregate(preds, task: Task, hard_examples: int) -> tuple[int, int, dict, tuple | None]:
    """(rows, correct rows, task metrics, hard-example cut) in one distributed pass."""
    from ray.data.aggregate import Count, Mean, Sum, ValueCounter

    qa = task.type == "extractive_qa"
    summary = preds.map_batches(_summary_columns, fn_kwargs={"qa": qa}, batch_format="pyarrow")
    aggs = [Count(), Sum("correct")]
    aggs.append(Mean("f1") if qa else ValueCounter("pair", alias_name="confusion"))
    if hard_examples > 0:
        aggs.append(_lowest_k_aggregate(hard_examples))
    agg = summary.aggregate(*aggs)
    n, n_correct = int(agg["count()"]), int(agg["sum(correct)"] or 0)
    if qa:
        # The predictor's QA `correct` is SQuAD exact match and `f1` its token F1 (s3ray.tasks.qa).
        metrics = {"exact_match": n_correct / n, "f1": float(agg["mean(f1)"]), "n": n} if n else {
            "exact_match": float("nan"), "f1": float("nan"), "n": 0}
    else:
        conf = agg["confusion"] or {"values": [], "counts": []}
        counts = {tuple(v.split(_SEP, 1)): int(c) for v, c in zip(conf["values"], conf["counts"])}
        metrics = macro_f1_from_counts(counts, task.labels)
    lowest = agg.get("lowest_k") or []
    cut = tuple(max(tuple(x) for x in lowest)) if lowest else None
    return n, n_correct, metrics, cut


# --- Ray placement -------------------------------------------------------------------------------------

def _cpu_thread_env(use_gpu: bool, concurrency: int) -> dict:
    """On CPUs, let each inference actor use its share of the cluster's cores.

    Ray starts workers with OMP_NUM_THREADS = their CPU reservation (1), so a CPU actor would run torch on
    one thread while a plain loop uses every core. Reserving more CPUs per actor could starve the read/write
    tasks, so the actor keeps its 1-CPU reservation and gets more threads instead. A user-set
    OMP_NUM_THREADS wins."""
    import ray

    if use_gpu or "OMP_NUM_THREADS" in os.environ:
        return {}
    threads = max(1, int(ray.cluster_resources().get("CPU", 1)) // max(1, concurrency))
    return {"runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads)}}}


# --- the pipeline --------------------------------------------------------------------------------------

def _ensure_schema_file(folder: Path, schema: pa.Schema) -> None:
    """An empty result still gets one (empty) Parquet file, so readers see the columns, not a missing path."""
    folder.mkdir(parents=True, exist_ok=True)
    if not list(folder.glob("*.parquet")):
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

    Hard examples (`mining_cfg.hard_examples` > 0) are the correct rows with the smallest margin, ties
    broken by row id. `predictor_cls` defaults to `s3ray.student.predict.StudentPredictor` (a callable class
    over numpy batches that adds prediction / margin / correct, and f1 for QA). Ray must be initialised.
    """
    import ray.data

    if predictor_cls is None:
        from s3ray.student.predict import StudentPredictor as predictor_cls

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    pred_dir, err_dir = out_dir / "predictions", out_dir / "errors"
    for d in (pred_dir, err_dir):
        shutil.rmtree(d, ignore_errors=True)  # a re-run of a round replaces, never appends

    # 1. Inference. Small blocks (a few batches each) so every actor gets work and writing overlaps
    # inference even when the set is one file; this re-blocking streams (no shuffle, no barrier).
    use_gpu = bool(student_cfg.use_gpu)
    ds = read_rows(validation_path).repartition(
        target_num_rows_per_block=ROWS_PER_BLOCK_BATCHES * mining_cfg.batch_size
    )
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
        **_cpu_thread_env(use_gpu, mining_cfg.concurrency),
    )
    log.info("mining errors: %s over %s", checkpoint, validation_path)
    ds.write_parquet(str(pred_dir))
    t_pred = time.perf_counter() - t0

    # 2. Counts, metric and the hard-example cut, from the written predictions.
    preds = ray.data.read_parquet(str(pred_dir))
    schema = preds.schema().base_schema
    needed = ["correct", "margin", "prediction"] + (["f1"] if task.type == "extractive_qa" else ["label"])
    missing = [c for c in needed if c not in schema.names]
    if missing:
        gold = "answer" if task.type == "extractive_qa" else "label"
        raise ValueError(
            f"{predictor_cls.__name__} returned no {missing} columns (got {schema.names}); the validation "
            f"rows need their gold column {gold!r}"
        )
    n_rows, n_correct, metrics, cut = _aggregate(preds, task, mining_cfg.hard_examples)
    t_agg = time.perf_counter() - t0 - t_pred

    # 3. Errors and hard examples, one filter pass.
    errors = preds.map_batches(
        _select,
        fn_kwargs={"hard_margin": cut[0] if cut else None, "hard_key": cut[1] if cut else None},
        batch_format="pyarrow",
    )
    errors.write_parquet(str(err_dir))
    _ensure_schema_file(err_dir, schema.append(pa.field("kind", pa.string())))
    n_hard = min(mining_cfg.hard_examples, n_correct)
    if cut and "id" not in schema.names:
        # Without ids, rows tied at the cut's margin are all kept: count what was written.
        n_hard = ray.data.read_parquet(str(err_dir)).filter(expr="kind == 'hard'").count()

    result = MiningResult(
        errors_path=str(err_dir),
        predictions_path=str(pred_dir),
        n_rows=n_rows,
        n_errors=n_rows - n_correct,
        n_hard=n_hard,
        metrics=metrics,
        seconds=time.perf_counter() - t0,
    )
    log.info(
        "mined %d errors (+%d hard) of %d rows in %.1fs (predict %.1fs, aggregate %.1fs, errors %.1fs); %s",
        result.n_errors, result.n_hard, result.n_rows, result.seconds, t_pred, t_agg,
        result.seconds - t_pred - t_agg, metrics,
    )
    return result
