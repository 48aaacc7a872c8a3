"""Error mining with Ray Data: streamed over several Parquet files, checked against a plain loop.

How "the driver never materialises the set" is checked: every row carries a wide `payload` column (40 kB of
text), so the 3,000-row set is ~120 MB of Python strings if it ever reaches the driver as rows or pandas.
The driver's resident memory is sampled (from /proc, by a thread) while a warm `mine_errors` runs, and its
growth must stay far below that size; a positive control runs the same meter over `take_all()` on the same
data and must see it. Both run in a fresh driver process joined to the test cluster, so memory freed by
earlier tests can't hide growth. (tracemalloc was used first, but its allocator hooks crashed the process when
Ray's native threads allocated under load.) The pipeline's write tasks return one small summary per block, and
the predictions land in several Parquet files, never one collected table.
"""

from __future__ import annotations

import ctypes
import gc
import gzip
import json
import os
import random
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fixtures_student import save_student_checkpoint

from s3ray.config import MiningConfig, StudentConfig, TaskConfig
from s3ray.mining import mine_errors, read_dataset, read_errors
from s3ray.mining.mine import _prediction_sink
from s3ray.tasks import make_task
from s3ray.tasks.base import accuracy_and_macro_f1, macro_f1_from_counts

REPO = Path(__file__).resolve().parents[1]
LABELS = ["entailment", "not_entailment"]
N_ROWS, N_FILES, PAYLOAD_CHARS, HARD = 3000, 6, 40_000, 25


def _read_jsonl(path: Path) -> list[dict]:
    op = gzip.open if path.suffix == ".gz" else open
    with op(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def save_tiny_checkpoint(encoder_dir: Path, dest: Path, task, max_length: int = 64) -> Path:
    """A student checkpoint saved directly rather than trained, its head re-drawn with large random weights
    so predictions vary with the input."""
    return Path(save_student_checkpoint(encoder_dir, dest, task, max_length, head_scale=2.0))


def make_pair_rows() -> list[dict]:
    """3,000 pair rows made from real RTE/QNLI halves, recombined with seeded labels (varied lengths)."""
    real = []
    for name in ("rte/validation.jsonl", "rte/train.jsonl", "qnli/validation.jsonl", "qnli/test.jsonl"):
        real += _read_jsonl(REPO / "data" / name)
    rng = random.Random(0)
    letters = np.random.default_rng(0).integers(97, 123, size=(N_ROWS, PAYLOAD_CHARS), dtype=np.uint8)
    rows = []
    for i in range(N_ROWS):
        a, b = rng.choice(real), rng.choice(real)
        text_b = b["text_b"] if rng.random() < 0.5 else a["text_b"]
        rows.append({"id": f"r{i}", "text_a": a["text_a"], "text_b": text_b, "label": rng.choice(LABELS),
                     "payload": letters[i].tobytes().decode()})
    return rows


def write_parquet_parts(rows: list[dict], folder: Path, n_files: int = N_FILES) -> Path:
    per = -(-len(rows) // n_files)
    for k in range(n_files):
        pd.DataFrame(rows[k * per:(k + 1) * per]).to_parquet(folder / f"part-{k}.parquet", index=False)
    return folder


@pytest.fixture(scope="module")
def pair_rows() -> list[dict]:
    return make_pair_rows()


@pytest.fixture(scope="module")
def pair_parquet(pair_rows, tmp_path_factory) -> Path:
    return write_parquet_parts(pair_rows, tmp_path_factory.mktemp("pair_val"))


@pytest.fixture(scope="module")
def pair_ckpt(tiny_student_dir, tmp_path_factory) -> Path:
    task = make_task(TaskConfig(type="pair", description="premise"), LABELS)
    return save_tiny_checkpoint(tiny_student_dir, tmp_path_factory.mktemp("ckpt") / "pair", task)


@pytest.fixture(scope="module")
def pair_mining(ray_local, pair_parquet, pair_ckpt, tmp_path_factory):
    task = make_task(TaskConfig(type="pair", description="premise"), LABELS)
    out = tmp_path_factory.mktemp("mining")
    result = mine_errors(str(pair_ckpt), str(pair_parquet), task, StudentConfig(),
                         MiningConfig(batch_size=64, concurrency=2, hard_examples=HARD), out)
    return task, result


@contextmanager
def rss_growth():
    """Peak growth of this process's resident memory while the block runs, sampled every 10 ms.

    Memory freed earlier in the process (the warm-up run) first goes back to the OS (glibc malloc_trim):
    otherwise the block could reuse those pages and an allocation would not show as growth."""
    page = os.sysconf("SC_PAGE_SIZE")
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the control assertion below still guards the meter
        pass

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    base, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.01)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out = {}
    try:
        yield out
    finally:
        done.set()
        t.join()
        out["growth"] = max(peak[0], rss()) - base


def _plain_loop(ckpt: Path, rows: list[dict], batch_size: int = 64) -> pd.DataFrame:
    """The same StudentPredictor, called in a plain loop in this process."""
    from s3ray.student.predict import StudentPredictor

    pred = StudentPredictor(str(ckpt), batch_size=batch_size, device="cpu")
    outs = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        batch = {k: np.asarray([r[k] for r in chunk], dtype=object) for k in ("id", "text_a", "text_b", "label")}
        out = pred(batch)
        outs.append(pd.DataFrame({k: out[k] for k in ("id", "label", "prediction", "margin", "correct")}))
    return pd.concat(outs, ignore_index=True)


# --- without Ray ---------------------------------------------------------------------------------------

def test_macro_f1_from_counts_matches_row_metric():
    rng = random.Random(1)
    labels = ["a", "b", "c"]
    golds = [rng.choice(labels) for _ in range(500)]
    preds = [g if rng.random() < 0.6 else rng.choice(labels) for g in golds]
    counts: dict = {}
    for g, p in zip(golds, preds):
        counts[(g, p)] = counts.get((g, p), 0) + 1
    assert macro_f1_from_counts(counts, labels) == pytest.approx(accuracy_and_macro_f1(preds, golds, labels))


def test_read_dataset_names_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.validation"):
        read_dataset(tmp_path / "missing.parquet")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ValueError, match="expected Parquet, JSONL"):
        read_dataset(tmp_path)


# --- with Ray ------------------------------------------------------------------------------------------

def test_auto_pool_on_cpus_is_single_threaded_actors_on_every_core(ray_local, monkeypatch):
    from s3ray.mining.mine import inference_pool
    from s3ray.runtime import local_cores

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = local_cores()
    free = int(ray_local.available_resources().get("CPU", 0))

    def actors_threads(concurrency):
        args = inference_pool(False, concurrency)
        assert args["compute"].min_size == args["compute"].max_size  # a fixed pool on CPUs
        return args["compute"].max_size, int(args["runtime_env"]["env_vars"]["OMP_NUM_THREADS"])

    actors, threads = actors_threads("auto")
    assert 1 <= actors <= max(1, free - 1)  # a CPU stays free for the read and write tasks
    assert actors * threads <= max(cores, actors)
    if cores >= 2 and free >= 3:
        assert actors >= 2 and threads == cores // actors
    assert actors_threads(1) == (1, cores)  # one actor gets every core
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert "runtime_env" not in inference_pool(False, 1)  # the user's thread count wins


def _operators(ds) -> str:
    """The executed plan's operator names and stats."""
    return ds.materialize().stats()


def test_few_parquet_files_are_read_without_a_footer_actor_pool(ray_local, tmp_path, monkeypatch):
    """A handful of files: the V1 reader (footers read on the driver, no FooterReader actors starting beside
    the inference actors); many files: Ray Data's default. The caller's DataContext is left as it was."""
    import ray.data

    monkeypatch.delenv("RAY_DATA_USE_DATASOURCE_V2", raising=False)
    ctx = ray.data.DataContext.get_current()
    if getattr(ctx, "use_datasource_v2", None) is None:
        pytest.skip("this Ray has one Parquet reader")
    folder = tmp_path / "val"
    folder.mkdir()
    for i in range(3):
        pd.DataFrame({"id": [f"{i}-{j}" for j in range(10)], "text": ["x"] * 10}).to_parquet(folder / f"{i}.parquet")
    before = ctx.use_datasource_v2
    small = read_dataset(folder)
    assert ctx.use_datasource_v2 == before
    stats = _operators(small)
    assert small.count() == 30
    assert "ListFiles" not in stats and "ReadParquet" in stats, stats

    import s3ray.mining.read as mining_read

    monkeypatch.setattr(mining_read, "FOOTER_ACTOR_MIN_FILES", 3)
    many = read_dataset(folder)
    assert many.count() == 30
    assert ("ListFiles" in _operators(many)) == before

@pytest.mark.slow
def test_errors_are_exactly_the_misclassified_rows(pair_mining, pair_rows, pair_ckpt):
    _, result = pair_mining
    preds = pd.read_parquet(result.predictions_path)
    errors = pd.read_parquet(result.errors_path)
    assert result.n_rows == len(preds) == N_ROWS
    assert sorted(preds["id"]) == sorted(r["id"] for r in pair_rows)

    plain = _plain_loop(pair_ckpt, pair_rows).set_index("id")
    got = preds.set_index("id").loc[plain.index]
    assert (got["prediction"] == plain["prediction"]).all()
    np.testing.assert_allclose(got["margin"].to_numpy(), plain["margin"].to_numpy(), atol=1e-4)
    assert 0 < (~plain["correct"]).sum() < N_ROWS  # a non-trivial mix, so the checks below mean something

    err = errors[errors["kind"] == "error"]
    wrong_ids = set(plain.index[plain["prediction"] != plain["label"]])
    assert set(err["id"]) == wrong_ids and len(err) == result.n_errors == len(wrong_ids)
    # Original columns travel with the errors, so EES can prompt from them.
    assert {"text_a", "text_b", "label", "payload", "prediction", "margin", "correct"} <= set(errors.columns)
    row = err.iloc[0]
    src = next(r for r in pair_rows if r["id"] == row["id"])
    assert (row["text_a"], row["text_b"], row["label"]) == (src["text_a"], src["text_b"], src["label"])


@pytest.mark.slow
def test_hard_examples_are_the_lowest_margin_correct_rows(pair_mining):
    _, result = pair_mining
    preds = pd.read_parquet(result.predictions_path)
    hard = pd.read_parquet(result.errors_path).query("kind == 'hard'")
    assert len(hard) == result.n_hard == HARD
    assert hard["correct"].all()
    expected = np.sort(preds.loc[preds["correct"], "margin"].to_numpy())[:HARD]
    np.testing.assert_allclose(np.sort(hard["margin"].to_numpy()), expected)  # ties-safe: compare margins
    assert hard["margin"].max() <= preds.loc[preds["correct"], "margin"].quantile(0.1)


@pytest.mark.slow
def test_metrics_match_a_plain_computation(pair_mining):
    task, result = pair_mining
    preds = pd.read_parquet(result.predictions_path)
    expected = task.metrics(preds["prediction"].tolist(), preds["label"].tolist())
    assert result.metrics == pytest.approx(expected)
    assert result.metrics["accuracy"] == pytest.approx(1 - result.n_errors / N_ROWS)


def measure_driver_memory(address: str, ckpt: str, parquet: str, out_dir: str) -> dict:
    """Run in a fresh driver process joined to the test cluster (a clean heap: pages freed by earlier tests
    can't hide growth): mine once to warm up, then meter a second mining run and a positive control."""
    import ray

    ray.init(address=address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    task = make_task(TaskConfig(type="pair", description="premise"), LABELS)
    cfg = MiningConfig(batch_size=64, concurrency=2, hard_examples=HARD)
    mine_errors(ckpt, parquet, task, StudentConfig(), cfg, Path(out_dir) / "warm")  # imports, first use
    with rss_growth() as mining:
        result = mine_errors(ckpt, parquet, task, StudentConfig(), cfg, Path(out_dir) / "measured")
    with rss_growth() as control:
        rows = ray.data.read_parquet(parquet).take_all()  # the set as Python rows in this process
    return {"mining": mining["growth"], "control": control["growth"], "rows": len(rows), "mined": result.n_rows}


@pytest.mark.slow
def test_the_driver_never_holds_the_set(pair_mining, pair_parquet, pair_ckpt, tmp_path):
    """Streaming: the driver's memory grows far less than the set's size while it mines, while a take_all()
    of the same data (positive control) does show up on the same meter."""
    import subprocess
    import sys

    import ray

    _, result = pair_mining
    set_bytes = N_ROWS * PAYLOAD_CHARS
    assert len(list(Path(result.predictions_path).glob("*.parquet"))) > 1  # streamed as several blocks

    code = (f"import json, test_mining as t; print('RESULT', json.dumps(t.measure_driver_memory("
            f"{ray.get_runtime_context().gcs_address!r}, {str(pair_ckpt)!r}, {str(pair_parquet)!r}, "
            f"{str(tmp_path)!r})))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    m = json.loads(lines[-1][len("RESULT "):])
    print(f"driver RSS growth: mining {m['mining'] / 1e6:.1f} MB, take_all {m['control'] / 1e6:.1f} MB")
    assert m["mined"] == m["rows"] == N_ROWS
    assert m["control"] > set_bytes * 0.8  # the meter sees a materialised set
    assert m["mining"] < set_bytes / 3, (
        f"driver grew {m['mining'] / 1e6:.1f} MB while mining a {set_bytes / 1e6:.0f} MB set")


@pytest.mark.slow
def test_qa_mining_from_jsonl(ray_local, adqa_rows, tiny_student_dir, tmp_path):
    """Extractive QA: JSONL.gz input, errors = rows without exact match, EM/F1 from aggregations."""
    from s3ray.student.predict import StudentPredictor
    from s3ray.tasks.qa import exact_match, token_f1

    task = make_task(TaskConfig(type="extractive_qa"), None)
    # QA needs room for the question plus a context window (the window stride is max_length // 4).
    ckpt = save_tiny_checkpoint(tiny_student_dir, tmp_path / "qa_ckpt", task, max_length=256)
    # A third of the rows get the student's own span as gold, so the set holds right and wrong answers.
    own = StudentPredictor(str(ckpt), batch_size=16).predict_rows(adqa_rows)[0]
    rows = [dict(r, answer=p, answer_start=r["context"].index(p)) if i % 3 == 0 else r
            for i, (r, p) in enumerate(zip(adqa_rows, own))]
    path = tmp_path / "val.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    result = mine_errors(str(ckpt), str(path), task, StudentConfig(), MiningConfig(batch_size=16, hard_examples=3),
                         tmp_path / "out")
    preds = pd.read_parquet(result.predictions_path)
    assert result.n_rows == len(preds) == len(rows)
    # Predicted answers are non-empty spans of their contexts.
    assert all(p.strip() and p in c for p, c in zip(preds["prediction"], preds["context"]))
    em = [exact_match(p, g) for p, g in zip(preds["prediction"], preds["answer"])]
    f1 = [token_f1(p, g) for p, g in zip(preds["prediction"], preds["answer"])]
    assert 0 < sum(em) < len(rows)
    assert result.metrics["exact_match"] == pytest.approx(np.mean(em))
    assert result.metrics["f1"] == pytest.approx(np.mean(f1), abs=1e-6)
    errors = pd.read_parquet(result.errors_path)
    wrong = {i for i, e in zip(preds["id"], em) if not e}
    assert set(errors.loc[errors["kind"] == "error", "id"]) == wrong
    assert result.n_hard == min(3, len(rows) - len(wrong))


# --- idempotent writes ---------------------------------------------------------------------------------

def test_a_retried_write_task_replaces_its_part(tmp_path):
    """Ray retries write tasks: the same task index writes the same part name, atomically (no temp left)."""
    import pyarrow as pa

    task = make_task(TaskConfig(type="classification"), ["negative", "positive"])
    sink = _prediction_sink(tmp_path / "pred", tmp_path / "err", task, k=0)
    sink.on_write_start()
    block = pa.table({"id": ["a", "b", "c"], "label": ["positive"] * 3,
                      "prediction": ["positive", "negative", "negative"], "margin": [0.1, 0.2, 0.3],
                      "correct": [True, False, False]})
    ctx = type("Ctx", (), {"task_idx": 7})()
    for _ in range(2):  # the first attempt and its retry
        summary = sink.write([block], ctx)
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["part-000007.parquet"]
    assert sorted(p.name for p in (tmp_path / "err").iterdir()) == ["part-000007.parquet"]
    assert [r["id"] for r in read_errors(tmp_path / "err")] == ["b", "c"]
    assert summary["n"] == 3 and summary["n_correct"] == 1
    assert task.metrics_from_stats(summary["stats"]) == task.metrics(["positive", "negative", "negative"],
                                                                     ["positive"] * 3)


def test_read_errors_keeps_one_row_per_id(tmp_path):
    """Even if two parts hold the same error (an older writer, a copied file), EES sees it once."""
    rows = [{"id": "x", "text": "t", "kind": "error"}, {"id": "y", "text": "u", "kind": "error"}]
    for name in ("part-000001.parquet", "part-000002.parquet"):
        pd.DataFrame(rows).to_parquet(tmp_path / name, index=False)
    got = read_errors(tmp_path)
    assert [r["id"] for r in got] == ["x", "y"]


@pytest.mark.slow
def test_mining_twice_into_one_folder_gives_the_same_unique_errors(pair_mining, pair_parquet, pair_ckpt):
    task, result = pair_mining
    first = read_errors(result.errors_path)
    ids = list(pd.read_parquet(result.errors_path)["id"])
    assert len(ids) == len(set(ids)) == result.n_errors + result.n_hard
    again = mine_errors(str(pair_ckpt), str(pair_parquet), task, StudentConfig(),
                        MiningConfig(batch_size=64, concurrency=2, hard_examples=HARD),
                        Path(result.errors_path).parent)
    second = read_errors(again.errors_path)
    assert pd.read_parquet(again.errors_path)["id"].is_unique
    assert [(r["id"], r["kind"]) for r in second] == [(r["id"], r["kind"]) for r in first]
    assert again.n_errors == result.n_errors and again.metrics == result.metrics
