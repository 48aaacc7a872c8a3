"""Step 4 of S3: run the student over the real validation set and collect what it gets wrong.

What counts as an error is the task's (`Task.score_rows`: `correct` False); its metric is the task's too.
A streaming Ray Data pipeline, so the validation set may be far larger than the driver's memory:

    read (Parquet / JSONL / CSV) -> map_batches(StudentPredictor actors) -> PredictionSink

The sink is a Ray Data `Datasink`: each write task writes its block's predictions and its errors as Parquet
and returns a small summary (row and correct counts, the task's additive metric statistics, and its k
lowest-margin correct rows). Part files are named by write-task index and written under a temp name, then
renamed: a retried write task replaces its own part instead of adding a second copy. The driver merges those summaries (one per block, never rows) into the
metric and, when hard examples are asked for, a (margin, id) cut; a second pass over the written
predictions then adds the correct rows under the cut. Inference runs once; nothing is sorted or shuffled.
"""

from __future__ import annotations

import heapq
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from s3ray import storage
from s3ray.mining.read import read_dataset
from s3ray.runtime import alive_nodes, cap_to_local_cores
from s3ray.tasks.base import Task, merge_stats

log = logging.getLogger("s3ray.mining")

ROWS_PER_BLOCK_BATCHES = 4  # inference batches per block: enough blocks for every actor, few tasks


@dataclass
class MiningResult:
    """What one mining run found; every field is JSON-able (the pipeline stores `asdict(result)`)."""

    errors_path: str  # Parquet folder: errors (+ hard examples), original columns + prediction, margin, correct, kind
    predictions_path: str  # Parquet folder: every validation row with prediction / margin / correct
    n_rows: int
    n_errors: int
    n_hard: int
    metrics: dict  # the task's metrics on the validation set, plus n
    seconds: float


# --- per-block work (runs in Ray write tasks, never on the driver) ------------------------------------

def _array(col) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _row_keys(table: pa.Table) -> pa.Array:
    """A per-row tie-breaker for the hard-example order: the row id when there is one."""
    if "id" in table.column_names:
        return _array(pc.cast(table["id"], pa.string()))
    return pa.array([""] * table.num_rows, pa.string())


def _with_kind(table: pa.Table, kind: str) -> pa.Table:
    return table.append_column("kind", pa.array([kind] * table.num_rows, pa.string()))


def block_summary(table: pa.Table, task: Task, k: int) -> dict:
    """What the driver needs from one block: counts, the metric's additive statistics, k hard keys."""
    correct = _array(pc.fill_null(table["correct"], False))
    preds, golds = table["prediction"].to_pylist(), table[task.gold_field].to_pylist()
    out: dict = {"n": table.num_rows, "n_correct": int(pc.sum(correct).as_py() or 0),
                 "stats": task.metric_stats(preds, golds), "lowest": []}
    if k > 0:
        cand = pa.table({"margin": pc.cast(table["margin"], pa.float64()), "key": _row_keys(table)}).filter(correct)
        idx = pc.sort_indices(cand, sort_keys=[("margin", "ascending"), ("key", "ascending")])[:k]
        cand = cand.take(idx)
        out["lowest"] = list(zip(cand["margin"].to_pylist(), cand["key"].to_pylist()))
    return out


def merge_summaries(parts: list[dict], task: Task, k: int) -> tuple[int, int, dict, tuple | None]:
    """(rows, correct rows, task metric, hard-example cut) from the per-block summaries."""
    parts = [p for p in parts if p["n"]]
    n = sum(p["n"] for p in parts)
    n_correct = sum(p["n_correct"] for p in parts)
    metrics = task.metrics_from_stats(merge_stats(p["stats"] for p in parts))
    lowest = heapq.nsmallest(k, (tuple(x) for p in parts for x in p["lowest"])) if k > 0 else []
    return n, n_correct, metrics, (lowest[-1] if lowest else None)


def _below_cut(batch: pa.Table, margin: float, key: str) -> pa.Table:
    """Correct rows at or below the (margin, id) cut, as hard examples."""
    m = pc.cast(batch["margin"], pa.float64())
    below = pc.or_(pc.less(m, margin), pc.and_(pc.equal(m, margin), pc.less_equal(_row_keys(batch), key)))
    keep = pc.and_(pc.fill_null(batch["correct"], False), below)
    return _with_kind(batch.filter(keep), "hard")


def write_part(table: pa.Table, folder: str | Path, name: str) -> None:
    """Write `folder/name` durably and atomically: on a disk a hidden temp file (readers skip dot-files),
    fsync, rename; on an object store one PUT (atomic there). `folder` may be a URI every node sees."""
    storage.write_parquet(storage.join(str(folder), name), table)


def _prediction_sink(pred_dir: str, err_dir: str, task: Task, k: int):
    """A Ray Data Datasink writing each block's predictions and errors, returning its summary."""
    from ray.data import Datasink  # Ray stays out of the core's imports; this module is its Ray Data edge
    from ray.data.block import BlockAccessor

    needed = ["prediction", "margin", "correct", task.gold_field]

    class PredictionSink(Datasink):
        def __init__(self):
            self.summaries: list[dict] = []
            self.schema: pa.Schema | None = None

        def on_write_start(self, schema=None) -> None:
            if storage.is_local(pred_dir):
                Path(pred_dir).mkdir(parents=True, exist_ok=True)
                Path(err_dir).mkdir(parents=True, exist_ok=True)

        def write(self, blocks, ctx) -> dict:
            tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
            tables = [t for t in tables if t.num_rows]
            if not tables:
                return {"n": 0, "n_correct": 0, "stats": {}, "lowest": [], "schema": None}
            table = pa.concat_tables(tables, promote_options="default")
            missing = [c for c in needed if c not in table.column_names]
            if missing:
                raise ValueError(
                    f"the student predictor's output lacks {missing} (got {table.column_names}); mining needs "
                    f"the validation rows' gold column {task.gold_field!r}"
                )
            name = f"part-{ctx.task_idx:06d}.parquet"  # one name per write task: a retry replaces it
            write_part(table, pred_dir, name)
            errors = table.filter(pc.invert(pc.fill_null(table["correct"], False)))
            if errors.num_rows:
                write_part(_with_kind(errors, "error"), err_dir, name)
            return {**block_summary(table, task, k), "schema": table.schema.serialize().to_pybytes()}

        def on_write_complete(self, write_result) -> None:
            self.summaries = list(write_result.write_returns)
            for s in self.summaries:
                if s.get("schema") and self.schema is None:
                    self.schema = pa.ipc.read_schema(pa.py_buffer(s["schema"]))

    return PredictionSink()


# --- Ray placement -------------------------------------------------------------------------------------

AUTO_MAX_CPU_ACTORS = 8  # 'auto' on CPUs: one actor per core, up to this many


def inference_pool(use_gpu: bool, concurrency: int | str) -> dict:
    """`map_batches` arguments for the inference actors: how many, and on CPUs how many threads each.

    On CPUs, several single-threaded actors beat one actor on every core: on 2 cores, two 1-thread actors
    mined 20,000 rows at 1.04x a plain 2-thread loop (first to last batch), one 2-thread actor at 0.90x
    (benchmarks/mining_throughput.py). So CPU 'auto' is one actor per core, capped by the free CPUs less
    one kept for the read and write tasks. On one node each actor keeps a 1-CPU reservation (more could
    starve those tasks) and gets its share of the real cores as OMP_NUM_THREADS (a user's own setting
    wins); across nodes it reserves its threads as CPUs so Ray spreads the actors. GPU 'auto' grows from
    one actor to one per GPU as GPUs are free (a teacher replica may hold some)."""
    import ray  # see _prediction_sink
    from ray.data import ActorPoolStrategy

    if use_gpu:
        gpus = max(1, int(ray.cluster_resources().get("GPU", 1)))
        pool = ActorPoolStrategy(min_size=1, max_size=gpus) if concurrency == "auto" else ActorPoolStrategy(
            size=int(concurrency))
        return {"compute": pool, "num_gpus": 1}
    cores = max(1, int(cap_to_local_cores(ray.cluster_resources().get("CPU", 1))))
    if concurrency == "auto":
        free = int(ray.available_resources().get("CPU", 0)) - 1  # one CPU left for the read and write tasks
        actors = max(1, min(cores, AUTO_MAX_CPU_ACTORS, free))
    else:
        actors = int(concurrency)
    threads = max(1, cores // actors)
    args: dict = {"compute": ActorPoolStrategy(size=actors)}
    nodes = alive_nodes()
    if len(nodes) > 1:
        node_cpus = [int(n["Resources"]["CPU"]) for n in nodes if n["Resources"].get("CPU")]
        args["num_cpus"] = min([threads] + node_cpus)  # fits on the smallest node
    elif "OMP_NUM_THREADS" not in os.environ:
        args["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(threads)}}
    return args


# --- the pipeline --------------------------------------------------------------------------------------

def _ensure_schema_file(folder: str, schema: pa.Schema) -> None:
    """An empty result still gets one (empty) Parquet file, so readers see the columns, not a missing path."""
    if not [n for n in storage.list_dir(folder) if n.endswith(".parquet") and not n.startswith(".")]:
        storage.write_parquet(storage.join(folder, "empty.parquet"), schema.empty_table())


def _add_hard_examples(pred_dir: str, err_dir: str, cut: tuple, expected: int, schema) -> int:
    """Second pass, only for hard examples: the correct rows under the global (margin, id) cut, written
    beside the errors. Returns how many were written."""
    hard = read_dataset(pred_dir).map_batches(
        _below_cut, fn_kwargs={"margin": cut[0], "key": cut[1]}, batch_format="pyarrow"
    )
    fs, inside = storage.resolve(err_dir)  # Ray names files by write task: a retried task rewrites its own file
    hard.write_parquet(inside, filesystem=fs)
    if schema is not None and "id" not in schema.names:
        # Without ids, rows tied at the cut's margin are all kept: count what was written.
        return read_dataset(err_dir).filter(expr="kind == 'hard'").count()
    return expected


def mine_errors(
    checkpoint: str,
    validation_path: str,
    task: Task,
    student_cfg,
    mining_cfg,
    out_dir: str | Path,
    predictor_cls: type | None = None,
    resources: dict | None = None,
) -> MiningResult:
    """Predict every validation row with the student at `checkpoint`, write predictions and errors to Parquet
    under `out_dir` ("predictions/", "errors/"), and return counts and the task metric.

    Hard examples (`mining_cfg.hard_examples` > 0) are the correct rows with the smallest margin, ties
    broken by row id. `predictor_cls` defaults to `s3ray.student.predict.StudentPredictor` (a callable class
    over numpy batches that adds prediction / margin and the task's `score_rows` columns); it is built with
    the caller's `task`. Re-running into the same `out_dir` replaces the earlier result. Ray must be
    initialised. `checkpoint`, `validation_path` and `out_dir` may be object store URIs (a multi-node run's
    storage): the actors then load their own copy of the checkpoint and every part goes straight there.
    `resources`: custom Ray resources each inference actor asks for (student.resources).
    """
    if predictor_cls is None:
        # torch and transformers load only when mining runs (the predictor module imports them).
        from s3ray.student.predict import StudentPredictor as predictor_cls

    t0 = time.perf_counter()
    pred_dir, err_dir = storage.join(str(out_dir), "predictions"), storage.join(str(out_dir), "errors")
    for d in (pred_dir, err_dir):
        storage.delete_dir(d)  # a re-run of a round replaces, never appends

    # 1. Inference. Small blocks (a few batches each) so every actor gets work and writing overlaps
    # inference even when the set is one file; this re-blocking streams (no shuffle, no barrier).
    use_gpu = bool(student_cfg.use_gpu)
    ds = read_dataset(validation_path).repartition(
        target_num_rows_per_block=ROWS_PER_BLOCK_BATCHES * mining_cfg.batch_size
    )
    ds = ds.map_batches(
        predictor_cls,
        fn_constructor_kwargs={
            "checkpoint": str(checkpoint),
            "batch_size": mining_cfg.batch_size,
            "device": "cuda" if use_gpu else "cpu",
            "task": task,
        },
        batch_size=mining_cfg.batch_size,
        batch_format="numpy",
        **inference_pool(use_gpu, mining_cfg.concurrency),
        **({"resources": dict(resources)} if resources else {}),
    )
    log.info("mining errors: %s over %s", checkpoint, validation_path)
    k = mining_cfg.hard_examples
    sink = _prediction_sink(pred_dir, err_dir, task, k)
    ds.write_datasink(sink)
    n_rows, n_correct, metrics, cut = merge_summaries(sink.summaries, task, k)
    t_pred = time.perf_counter() - t0

    n_hard = 0 if cut is None else _add_hard_examples(pred_dir, err_dir, cut, min(k, n_correct), sink.schema)
    if sink.schema is not None:
        _ensure_schema_file(err_dir, sink.schema.append(pa.field("kind", pa.string())))

    result = MiningResult(
        errors_path=err_dir,
        predictions_path=pred_dir,
        n_rows=n_rows,
        n_errors=n_rows - n_correct,
        n_hard=n_hard,
        metrics=metrics,
        seconds=time.perf_counter() - t0,
    )
    log.info(
        "mined %d errors (+%d hard) of %d rows in %.1fs (predict %.1fs, hard examples %.1fs); %s",
        result.n_errors, result.n_hard, result.n_rows, result.seconds, t_pred, result.seconds - t_pred, metrics,
    )
    return result
