"""`s3ray generate`: the streaming corpus driver, on the tiny teacher (transformers engine, few new tokens).

One uninterrupted corpus is the reference. A second corpus is SIGKILLed twice at random points while it
generates, then resumed: it must equal the reference row for row, and no request whose answer was in the
generation cache at a kill is generated again (the engines' opt-in call log, S3RAY_ENGINE_CALL_LOG, says what
each engine finished). The default test is small enough for CI on two cores; the issue's 20k-row kill test
is opt-in (`make corpus-scale`), and driver RSS at 10k/100k rows is in benchmarks/corpus_generation.py.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from s3ray.synthesis.dedup_scale import EXACT, NEAR, drops_of_shard, find_duplicates

REPO = Path(__file__).resolve().parents[1]
ROWS, SHARD = 700, 128


def _config(tmp: Path, teacher_dir: Path, name: str, rows: int = ROWS, shard: int = SHARD) -> Path:
    cfg = {
        "run": {"name": name, "output_dir": str(tmp / name), "seed": 3},
        "task": {"type": "classification", "labels": ["negative", "positive"], "description": "movie review"},
        "data": {"validation": str(REPO / "data/sst2/validation.jsonl"), "test": str(REPO / "data/sst2/test.jsonl"),
                 "validation_size": 40, "test_size": 40},
        "teacher": {"model": str(teacher_dir), "engine": "transformers", "max_in_flight": 32,
                    "sampling": {"max_tokens": 8}, "transformers": {"batch_size": 32}},
        "synthesis": {"num_rationales": 3, "rationales_per_example": 1, "corpus_rows": rows,
                      "corpus_shard_size": shard, "min_chars": 4},
        "ray": {"num_cpus": 2},
    }
    path = tmp / f"{name}.json"  # YAML is a superset of JSON
    path.write_text(json.dumps(cfg))
    return path


def _generate(config: Path, call_log: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "S3RAY_ENGINE_CALL_LOG": str(call_log)}
    return subprocess.Popen([sys.executable, "-m", "s3ray.cli", "generate", str(config), "--backend", "local", *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _lines(path: Path) -> list[str]:
    return [line.split("\t")[0] for line in path.read_text().splitlines()] if path.is_file() else []


def _cached_ids(run: Path) -> set[str]:
    db = sqlite3.connect(run / "teacher_cache.sqlite")
    try:
        return {r[0] for r in db.execute("SELECT request_id FROM generations")}
    finally:
        db.close()


def _corpus(run: Path) -> list[dict]:
    files = sorted((run / "corpus").glob("part-*.parquet"))
    return sorted((r for f in files for r in pq.read_table(f).to_pylist()), key=lambda r: r["id"])


def _killed_twice_equals_uninterrupted(tmp_path: Path, teacher_dir: Path, rows: int, shard: int,
                                       calls_before_kill: tuple[int, int]) -> list[float]:
    """A corpus SIGKILLed twice (process group, after a random number of newly finished engine calls) and
    resumed equals an uninterrupted one; returns the reference's driver peak RSS per shard."""
    log_ref, log_cut = tmp_path / "calls_ref.log", tmp_path / "calls_cut.log"
    ref = _generate(_config(tmp_path, teacher_dir, "ref", rows, shard), log_ref)
    out = ref.communicate(timeout=1800)[0]
    assert ref.returncode == 0, out[-3000:]
    rss = [s["driver_peak_rss_mb"] for s in json.loads((tmp_path / "ref/corpus_state/state.json").read_text())["shards"]]

    cfg_cut, run_cut = _config(tmp_path, teacher_dir, "cut", rows, shard), tmp_path / "cut"
    rng = random.Random(7)
    kills: list[tuple[set[str], int]] = []  # (ids cached at the kill, call-log length at the kill)
    for kill in range(2):
        proc = _generate(cfg_cut, log_cut, *(["--resume"] if kill else []))
        goal = len(_lines(log_cut)) + rng.randrange(*calls_before_kill)
        while proc.poll() is None and len(_lines(log_cut)) < goal:
            time.sleep(0.05)
        assert proc.poll() is None, f"the driver ended before it was killed: {proc.communicate()[0][-2000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills.append((_cached_ids(run_cut), len(_lines(log_cut))))  # dead: the cache is as it was at the kill
    proc = _generate(cfg_cut, log_cut, "--resume")
    out = proc.communicate(timeout=1800)[0]
    assert proc.returncode == 0, out[-3000:]

    got, want = _corpus(run_cut), _corpus(tmp_path / "ref")
    assert len(want) == rows and got == want  # same ids, same text, same every column
    calls = _lines(log_cut)
    for cached, at in kills:  # nothing the cache held at a kill was generated again afterwards
        assert cached and not set(calls[at:]) & cached
    assert {r["id"] for r in got} <= set(calls)  # every row was generated at least once

    card = json.loads((run_cut / "corpus_card.json").read_text())
    assert card["rows"] == rows and set(card["label_balance"]) == {"negative", "positive"}
    assert card["tokens"]["output"] > 0 and card["seed"] == 3
    import datasets

    loaded = datasets.load_dataset("parquet", data_dir=str(run_cut / "corpus"), split="train")
    assert loaded.num_rows == rows and sorted(loaded["id"]) == [r["id"] for r in want]
    return rss


@pytest.mark.slow
def test_generate_killed_twice_resumes_exactly(tmp_path, tiny_teacher_dir):
    rss = _killed_twice_equals_uninterrupted(tmp_path, tiny_teacher_dir, ROWS, SHARD, (60, 250))
    # Flat driver memory at this small scale (10k/100k rows: benchmarks/corpus_generation.py): the peak RSS
    # after the last shard is within 10% of the peak after the second (engine, Ray and imports loaded).
    assert len(rss) >= 5 and rss[-1] <= 1.10 * rss[1], rss


@pytest.mark.corpus_scale
def test_20k_row_corpus_killed_twice_resumes_exactly(tmp_path, tiny_teacher_dir):
    """The issue's scale: 20,000 rows in 10 shards, each kill after 1,000 to 9,000 newly finished engine
    calls (`make corpus-scale`; minutes on 2 cores, so not in the default suite)."""
    rss = _killed_twice_equals_uninterrupted(tmp_path, tiny_teacher_dir, 20_000, 2_000, (1_000, 9_000))
    assert len(rss) >= 10 and rss[-1] <= 1.10 * rss[1], rss


@pytest.mark.slow
def test_corpus_dedup_drops_planted_duplicates_across_shards(tmp_path, ray_local):
    base = ("the film is a warm and funny story about two old friends who drive across the country together, "
            "meet strangers in small towns, argue about music and finally learn to forgive each other for the past")
    rows = [
        [("seed/0", base), ("seed/1", "a cold, dull and lifeless remake that nobody asked for at all")],
        [("seed/130", base.upper() + "!"),  # exact copy once normalised, in another shard
         ("seed/131", base + " years"),  # near copy (Jaccard 0.97)
         ("seed/132", "an entirely different review about sound design, pacing and a great score")],
        [("seed/260", "a cold dull and lifeless remake that nobody asked for at all")],
    ]
    files = []
    for i, shard in enumerate(rows):
        f = tmp_path / "corpus" / f"part-{i:05d}.parquet"
        f.parent.mkdir(exist_ok=True)
        pq.write_table(pa.table({"id": [r[0] for r in shard], "text": [r[1] for r in shard],
                                 "label": ["positive"] * len(shard)}), f)
        files.append(f)
    out = tmp_path / "dedup-0"
    assert find_duplicates(files, ["text"], 0.8, out) == 3
    got = {}
    for i in range(3):
        t = drops_of_shard(out, i)
        got.update(zip(t.column("id").to_pylist(), t.column("reason").to_pylist()))
    assert got == {"seed/130": EXACT, "seed/131": NEAR, "seed/260": EXACT}


@pytest.mark.slow
def test_an_object_store_corpus_resumes_on_another_machine_from_the_uri_alone(tmp_path, tiny_teacher_dir,
                                                                              ray_local, monkeypatch):
    """run.output_dir = an object store URI (fsspec's in-memory one here): the corpus is built in a local
    working copy and every shard, the state and the generation cache go to the URI. A driver stopped after
    its first shard, and another driver with an empty disk that resumes from the URI, give the same corpus as
    one local run, and the second driver asks the teacher for nothing the first had finished."""
    import uuid

    from s3ray import storage
    from s3ray.config import load_config
    from s3ray.pipeline.s3 import prepare_inputs
    from s3ray.synthesis import shards
    from s3ray.synthesis.corpus import generate_corpus

    rows, shard = 150, 64
    ref = load_config(_config(tmp_path, tiny_teacher_dir, "ref", rows, shard))
    generate_corpus(ref, prepare_inputs(ref), backend="local")
    uri = f"memory://s3ray-corpus/{uuid.uuid4().hex}/run"

    def on(machine: str):
        return load_config(_config(tmp_path, tiny_teacher_dir, "obj", rows, shard),
                           [f"run.output_dir={uri}", f"run.local_dir={tmp_path / machine}"])

    write_shard = shards.CorpusState.write_shard

    def stop_after_the_first(state, i, table, record):
        write_shard(state, i, table, record)
        raise KeyboardInterrupt("stopped")

    monkeypatch.setattr(shards.CorpusState, "write_shard", stop_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        generate_corpus(on("a"), prepare_inputs(on("a")), backend="local")
    monkeypatch.setattr(shards.CorpusState, "write_shard", write_shard)
    first = {r["id"] for r in storage.read_parquet(storage.join(uri, "corpus", shards.shard_name(0))).to_pylist()}
    assert first and storage.exists(storage.join(uri, "teacher_cache.sqlite"))

    calls = tmp_path / "calls_b.log"
    monkeypatch.setenv("S3RAY_ENGINE_CALL_LOG", str(calls))
    card = generate_corpus(on("b"), prepare_inputs(on("b")), resume=True, backend="local")
    assert not first & set(_lines(calls)) and _lines(calls)  # shard 0's calls came from the pulled cache
    got = sorted((r for f in card["files"] for r in storage.read_parquet(storage.join(uri, "corpus", f)).to_pylist()),
                 key=lambda r: r["id"])
    assert [(r["id"], r["text"]) for r in got] == [(r["id"], r["text"]) for r in _corpus(tmp_path / "ref")]
    assert len(got) == rows and storage.exists(storage.join(uri, "corpus_card.json"))


def test_generate_iter_streams_in_order_and_caches_whole_chunks(tmp_path, tiny_teacher_dir, monkeypatch):
    from s3ray.config import TeacherConfig
    from s3ray.teacher.teacher import make_teacher
    from s3ray.teacher.types import GenerationRequest, Sampling

    cfg = TeacherConfig(model=str(tiny_teacher_dir), engine="transformers", max_in_flight=8)
    reqs = [GenerationRequest(f"r/{i}", ({"role": "user", "content": f"review {i}"},),
                              Sampling(max_tokens=4, seed=i)) for i in range(40)]
    log = tmp_path / "calls.log"
    monkeypatch.setenv("S3RAY_ENGINE_CALL_LOG", str(log))
    with make_teacher(cfg, str(tiny_teacher_dir), 0, cache_path=tmp_path / "c.sqlite", backend="local") as t:
        block = 2 * t.chunk_size()
        got = list(t.generate_iter(iter(reqs), block))
        assert [r.request_id for r in got] == [r.request_id for r in reqs] and all(r.ok for r in got)
        assert sorted(_lines(log)) == sorted(r.request_id for r in reqs)  # each generated once
        again = list(t.generate_iter(iter(reqs), block))  # everything cached: no engine call
        assert [r.text for r in again] == [r.text for r in got] and all(r.cached for r in again)
        assert len(_lines(log)) == len(reqs)


def test_generate_resume_without_corpus_is_refused(tmp_path, tiny_teacher_dir, capsys):
    from s3ray.cli import main

    cfg = _config(tmp_path, tiny_teacher_dir, "none")
    assert main(["generate", str(cfg), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "drop --resume" in err
    assert not (tmp_path / "none" / "corpus").exists()  # refused before anything was created


def test_generate_job_joins_the_cluster_and_continues_a_corpus():
    sys.path.insert(0, str(REPO / "jobs"))
    from generate_job import job_argv

    assert job_argv(["c.yaml", "--rows", "10"], True, lambda: False) == [
        "generate", "c.yaml", "--rows", "10", "--set", "ray.address=auto"]
    assert job_argv(["c.yaml"], False, lambda: True) == ["generate", "c.yaml", "--resume"]
    assert job_argv(["c.yaml", "--resume"], False, lambda: True).count("--resume") == 1
