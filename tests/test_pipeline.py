"""The S3 loop end to end on tiny models: Ray + vLLM (CPU) teacher, Ray Train student, Ray Data mining.

One run is paused after the first error-extrapolation step, then "crashes" (that step's record and output
are removed, as if the process died mid-step), then resumes: nothing finished is redone, no row is
duplicated, and the run completes with a full report.
"""

import json
import subprocess
import sys

import datasets
import pyarrow.parquet as pq
import pytest

from s3ray.config import config_from_dict
from s3ray.pipeline.rundir import RunDirError
from s3ray.pipeline.s3 import prepare_inputs, run_s3


def _cfg(tmp_path, teacher_dir, student_dir, **synthesis):
    return config_from_dict({
        "run": {"name": "tiny", "output_dir": str(tmp_path / "run"), "seed": 3},
        "task": {"type": "classification", "labels": ["negative", "positive"], "description": "movie review"},
        "data": {"validation": "data/sst2/validation.jsonl", "test": "data/sst2/test.jsonl",
                 "validation_size": 40, "test_size": 40},
        "teacher": {"model": str(teacher_dir), "engine": "vllm", "kv_cache_space_gb": 1, "max_model_len": 512,
                    "sampling": {"max_tokens": 24}},
        "synthesis": {"num_rationales": 3, "rationales_per_example": 1, "seed_examples": 16, "rounds": 1,
                      "min_chars": 4, **synthesis},
        "student": {"model": str(student_dir), "epochs": 2, "batch_size": 8, "max_length": 32},
        "mining": {"batch_size": 16},
    })


@pytest.mark.slow
def test_full_round_pause_crash_resume(tmp_path, ray_local, tiny_teacher_dir, tiny_student_dir):
    cfg = _cfg(tmp_path, tiny_teacher_dir, tiny_student_dir)
    inputs = prepare_inputs(cfg)
    run_dir = tmp_path / "run"

    run_s3(cfg, inputs=inputs, stop_after="round1/synthesis")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert list(manifest["steps"]) == ["rationales", "round0/synthesis", "round0/train", "round0/mine",
                                       "round1/synthesis"]
    seed_before = pq.read_table(run_dir / "rounds/round_0.parquet").to_pylist()
    round1_before = pq.read_table(run_dir / "rounds/round_1.parquet").to_pylist()
    mined = manifest["steps"]["round0/mine"]["result"]
    assert mined["n_rows"] == 40 and mined["n_errors"] >= 1

    # The same run dir without --resume is refused instead of overwritten.
    with pytest.raises(RunDirError, match="--resume"):
        run_s3(cfg, inputs=inputs)

    # Crash mid-step: the step is unrecorded and its output half-written (here: gone).
    del manifest["steps"]["round1/synthesis"]
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    (run_dir / "rounds/round_1.parquet").unlink()

    report = run_s3(cfg, resume=True, inputs=inputs)
    after = json.loads((run_dir / "manifest.json").read_text())["steps"]
    # Finished steps were not redone...
    for name in ["rationales", "round0/synthesis", "round0/train", "round0/mine"]:
        assert after[name]["finished"] == manifest["steps"][name]["finished"]
    # ...and the re-run synthesis step was served from the generation cache, not regenerated.
    stats = after["round1/synthesis"]["result"]["stats"]
    assert stats["requested"] == mined["n_errors"] and stats["cached"] == stats["requested"]
    assert pq.read_table(run_dir / "rounds/round_1.parquet").to_pylist() == round1_before
    assert pq.read_table(run_dir / "rounds/round_0.parquet").to_pylist() == seed_before

    # The final dataset: every round, no duplicate ids, provenance on every row, loads with `datasets`.
    final = datasets.load_dataset("parquet", data_files=str(run_dir / "final/train.parquet"), split="train")
    assert len(final) == len(seed_before) + len(round1_before)
    assert len(set(final["id"])) == len(final)
    assert set(final["source"]) <= {"seed", "ees"} and set(final["label"]) <= {"negative", "positive"}
    val = {r["id"]: r for r in inputs.validation}
    for row in round1_before:  # EES rows: parent is a real validation error, label is its gold label
        assert row["round"] == 1 and row["parent_error_id"] in val
        assert row["label"] == val[row["parent_error_id"]]["label"]
    assert all(r["teacher_model"] and r["prompt_hash"] and r["seed"] is not None for r in final)

    # The report: four students measured side by side, tokens per round, drops counted, plot written.
    methods = [c["method"] for c in report["comparison"]]
    assert len(methods) == 4 and all(c["test"] is not None for c in report["comparison"])
    eq = after["baseline/equal_budget/train"]["result"]
    assert eq["n_train"] == len(final)  # equal budget means equal size
    assert report["rounds"][0]["teacher_tokens"] > 0 and report["complete"]
    for f in ["report.md", "report.json", "report.png"]:
        assert (run_dir / f).stat().st_size > 0
    assert "real validation rows only" in (run_dir / "report.md").read_text()


def test_cli_help_and_clear_errors(tmp_path):
    out = subprocess.run([sys.executable, "-m", "s3ray.cli", "--help"], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and "--resume" in out.stdout + subprocess.run(
        [sys.executable, "-m", "s3ray.cli", "run", "--help"], capture_output=True, text=True, check=False).stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {validation: data/sst2/validation.jsonl}\nteacher: {engine: vlm}\n")
    out = subprocess.run([sys.executable, "-m", "s3ray.cli", "run", str(bad)], capture_output=True, text=True, check=False)
    assert out.returncode == 2 and "teacher.engine" in out.stderr and "Traceback" not in out.stderr
    missing = tmp_path / "missing.yaml"
    missing.write_text(f"data: {{validation: {tmp_path}/nope.jsonl}}\nteacher: {{model: {tmp_path}/x}}\n")
    out = subprocess.run([sys.executable, "-m", "s3ray.cli", "validate", str(missing)], capture_output=True, text=True, check=False)
    assert out.returncode == 2 and "nope.jsonl" in out.stderr
