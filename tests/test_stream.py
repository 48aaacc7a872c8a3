"""The S3 loop's synthesis steps on the streaming path (synthesis/stream.py), on the tiny teacher in-process.

A seed-synthesis step is SIGKILLed mid-way (after its first part is written), then run again on the same run
directory: its rows equal an uninterrupted step's, the finished parts are kept, and no request the cache
held at the kill reaches the engine again (S3RAY_ENGINE_CALL_LOG).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from s3ray.synthesis.collect import SynthesisStats
from s3ray.synthesis.stream import StepParts, batched

REPO = Path(__file__).resolve().parents[1]
SEED, SHARD = 256, 64


def _cfg_dict(run: Path, teacher_dir: Path) -> dict:
    return {
        "run": {"name": "stream", "output_dir": str(run), "seed": 5},
        "task": {"type": "classification", "labels": ["negative", "positive"], "description": "movie review"},
        "data": {"validation": str(REPO / "data/sst2/validation.jsonl"), "validation_size": 40},
        "teacher": {"model": str(teacher_dir), "engine": "transformers", "max_in_flight": 32,
                    "sampling": {"max_tokens": 6}, "transformers": {"batch_size": 32}},
        "synthesis": {"num_rationales": 3, "rationales_per_example": 1, "seed_examples": SEED, "min_chars": 1,
                      "corpus_shard_size": SHARD},
    }


def seed_step(cfg_path: str, resume: bool) -> dict:
    """Rationales and seed synthesis of the config at `cfg_path` (local transformers teacher, no Ray)."""
    from s3ray.config import config_from_dict
    from s3ray.pipeline.rundir import RunDir
    from s3ray.pipeline.s3 import S3Steps, prepare_inputs
    from s3ray.teacher.teacher import make_teacher

    cfg = config_from_dict(json.loads(Path(cfg_path).read_text()))
    inputs = prepare_inputs(cfg, resolve_models=False)
    inputs.teacher_path = cfg.teacher.model
    run = RunDir(cfg.run.output_dir, cfg.model_dump(mode="json"), resume)
    try:
        with make_teacher(cfg.teacher, cfg.teacher.model, run_seed=cfg.run.seed, backend="local",
                          cache_path=run.path / "teacher_cache.sqlite", model_name=cfg.teacher.model) as teacher:
            s3 = S3Steps(cfg, inputs, run, teacher)
            res = s3.synthesize_seed(s3.write_rationales().rationales)
        return {"rows": pq.read_table(run.abs(res.path)).to_pylist(), "stats": res.stats}
    finally:
        run.close()


def _lines(path: Path) -> list[str]:
    return [line.split("\t")[0] for line in path.read_text().splitlines()] if path.is_file() else []


def test_a_seed_step_killed_mid_way_resumes_from_its_parts_and_the_cache(tmp_path, tiny_teacher_dir, monkeypatch):
    ref_cfg = tmp_path / "ref.json"
    ref_cfg.write_text(json.dumps(_cfg_dict(tmp_path / "ref", tiny_teacher_dir)))
    want = seed_step(str(ref_cfg), resume=False)
    assert len(want["rows"]) > SEED // 2 and not (tmp_path / "ref/rounds/round_0.parts").exists()  # merged

    cut_cfg, run = tmp_path / "cut.json", tmp_path / "cut"
    cut_cfg.write_text(json.dumps(_cfg_dict(run, tiny_teacher_dir)))
    log = tmp_path / "calls.log"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "S3RAY_ENGINE_CALL_LOG": str(log)}
    proc = subprocess.Popen([sys.executable, "-c", f"import test_stream as t; t.seed_step({str(cut_cfg)!r}, False)"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    parts = run / "rounds/round_0.parts"
    while proc.poll() is None and not (parts / "part-00001.parquet").exists():
        time.sleep(0.05)
    assert proc.poll() is None, f"the step ended before it was killed: {proc.communicate()[0][-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = {p.name: p.stat().st_mtime_ns for p in parts.glob("part-*.parquet")}
    db = sqlite3.connect(run / "teacher_cache.sqlite")
    cached = {r[0] for r in db.execute("SELECT request_id FROM generations")}
    db.close()
    at_kill = len(_lines(log))

    monkeypatch.setenv("S3RAY_ENGINE_CALL_LOG", str(log))
    got = seed_step(str(cut_cfg), resume=True)
    assert got["rows"] == want["rows"]  # same ids, same text, every column
    calls = _lines(log)
    assert len(kept) >= 2 and cached and not set(calls[at_kill:]) & cached  # nothing cached was asked again
    assert len(calls) == len(set(calls)) == SEED + 6  # every request (and 6 rationale samples) exactly once
    st = got["stats"]
    # The kept parts' stats come from their metadata; later requests the cache held were answered by it.
    assert st["requested"] == SEED and st["kept"] == len(want["rows"])
    assert st["cached"] == len(cached) - 6 - SHARD * len(kept)


def test_parts_of_another_shard_size_are_dropped_and_stats_come_back(tmp_path):
    table = pa.table({"id": ["seed/0"], "text": ["a fine film"]})
    parts = StepParts(tmp_path / "p", 64)
    parts.write(0, table, SynthesisStats(requested=64, kept=1))
    parts.write(1, table, SynthesisStats(requested=64, kept=1))
    assert [r["stats"]["kept"] for r in parts.finished()] == [1, 1] and [r["end"] for r in parts.finished()] == [64, 128]
    other = StepParts(tmp_path / "p", 32)  # a resume whose chunk size changed: shards cut elsewhere
    assert other.finished() == [] and not list((tmp_path / "p").glob("part-*"))
    assert [len(b) for b in batched(range(130), 64)] == [64, 64, 2]
