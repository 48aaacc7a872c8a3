"""The S3 loop end to end on tiny models: Ray + vLLM (CPU) teacher, Ray Train student, Ray Data mining.

One run is paused after the first error-extrapolation step, then "crashes" (that step's record and output
are removed, as if the process died mid-step), then resumes: nothing finished is redone, no row is
duplicated, and the run completes with a full report.
"""

import json
import logging
import subprocess
import sys

import datasets
import pyarrow.parquet as pq
import pytest

from s3ray.config import config_from_dict
from s3ray.pipeline.rundir import RunDirError
from s3ray.pipeline.s3 import prepare_inputs, run_s3


def _cfg(tmp_path, teacher_dir, student_dir, release="auto", **synthesis):
    return config_from_dict({
        "run": {"name": "tiny", "output_dir": str(tmp_path / "run"), "seed": 3},
        "task": {"type": "classification", "labels": ["negative", "positive"], "description": "movie review"},
        "data": {"validation": "data/sst2/validation.jsonl", "test": "data/sst2/test.jsonl",
                 "validation_size": 40, "test_size": 40},
        "teacher": {"model": str(teacher_dir), "engine": "vllm",
                    "vllm": {"kv_cache_space_gb": 1, "max_model_len": 512},
                    "sampling": {"max_tokens": 24}, "release": release},
        "synthesis": {"num_rationales": 3, "rationales_per_example": 1, "seed_examples": 16, "rounds": 1,
                      "min_chars": 4, **synthesis},
        "student": {"model": str(student_dir), "epochs": 2, "batch_size": 8, "max_length": 32},
        "mining": {"batch_size": 16},
    })


@pytest.mark.slow
def test_full_round_pause_crash_resume(tmp_path, ray_local, tiny_teacher_dir, tiny_student_dir, caplog):
    # teacher.release=always: the replicas go while the student trains and mining runs (as on a GPU cluster
    # where both would not fit), and come back for the next synthesis step.
    cfg = _cfg(tmp_path, tiny_teacher_dir, tiny_student_dir, release="always")
    inputs = prepare_inputs(cfg)
    run_dir = tmp_path / "run"

    with caplog.at_level(logging.INFO, logger="s3ray.teacher"):
        run_s3(cfg, inputs=inputs, stop_after="round1/synthesis")
    assert len([r for r in caplog.records if "replica(s) ready" in r.getMessage()]) == 2  # started, released, back
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

    # The report: five students measured side by side, tokens per round, drops counted, plot written.
    methods = [c["method"] for c in report["comparison"]]
    assert len(methods) == 5 and all(c["test"] is not None for c in report["comparison"])
    plus = after["baseline/s3_plus_real/train"]["result"]  # the final synthetic set plus the real train rows
    real = after["baseline/real_validation/train"]["result"]
    assert plus["n_train"] == len(final) + real["n_train"] and plus["holdout_rows"] == real["holdout_rows"]
    eq = after["baseline/equal_budget/train"]["result"]
    assert eq["n_train"] == len(final)  # equal budget means equal size
    assert report["rounds"][0]["teacher_tokens"] > 0 and report["complete"]
    syn1 = after["round1/synthesis"]["result"]  # each round's balance, to see EES swing between labels
    assert sum(syn1["by_label"].values()) == syn1["rows"] and set(syn1["by_label"]) <= {"negative", "positive"}
    assert report["rounds"][1]["new_by_label"] == syn1["by_label"]
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


@pytest.mark.slow
def test_extractive_qa_round_with_the_embedded_teacher(tmp_path, ray_local, tiny_student_dir):
    """AdQA through the whole loop with the real embedded teacher (SmolLM2-135M on vLLM's CPU build): s3ray
    picks answer spans, the teacher writes questions, a span student trains, errors are mined and
    extrapolated on their own paragraph and gold answer, and the report scores F1."""
    from s3ray.tasks import ParseError

    cfg = config_from_dict({
        "run": {"name": "qa", "output_dir": str(tmp_path / "run"), "seed": 1},
        "task": {"type": "extractive_qa", "description": "paragraph"},
        "data": {"validation": "tests/data/adqa_sample.jsonl", "test": "data/adqa/test.jsonl.gz",
                 "validation_size": 24, "test_size": 16},
        "teacher": {"model": "embedded:smollm2-135m-instruct", "engine": "vllm",
                    "vllm": {"kv_cache_space_gb": 1, "max_model_len": 1024}, "sampling": {"max_tokens": 40}},
        "synthesis": {"seed_examples": 16, "rounds": 1, "max_ees_per_round": 6, "min_chars": 10,
                      "max_chars": 300},
        "student": {"model": str(tiny_student_dir), "epochs": 1, "batch_size": 8, "max_length": 128},
        "mining": {"batch_size": 8},
        "baselines": {"equal_budget": False, "real_validation": False},
    })
    inputs = prepare_inputs(cfg)
    report = run_s3(cfg, inputs=inputs)
    run_dir = tmp_path / "run"
    steps = json.loads((run_dir / "manifest.json").read_text())["steps"]

    seed = pq.read_table(run_dir / "rounds/round_0.parquet").to_pylist()
    seed_stats = steps["round0/synthesis"]["result"]["stats"]
    assert seed_stats["requested"] == 16 and seed_stats["kept"] == len(seed) >= 1
    known = {"empty", "refusal", "not_a_question", "too_short", "too_long", "question_contains_answer",
             "off_topic", "exact_duplicate", "near_duplicate", "copies_real_row", "near_copy_of_real_row"}
    assert set(seed_stats["dropped"]) <= known, seed_stats["dropped"]
    paragraphs = {r["context"] for r in inputs.validation}
    for row in seed:  # a real paragraph, a span of it, a question that does not give the answer away
        assert row["context"] in paragraphs and row["question"].endswith("?")
        assert row["context"][row["answer_start"]: row["answer_start"] + len(row["answer"])] == row["answer"]
        assert inputs.task.validate_row(row) is None
        with pytest.raises(ParseError, match="question_contains_answer"):
            inputs.task.parse_example(f"Is the answer really {row['answer']}?", None, row)

    mined = steps["round0/mine"]["result"]
    assert mined["n_rows"] == 24 and mined["metrics"]["n"] == 24
    ees = pq.read_table(run_dir / "rounds/round_1.parquet").to_pylist()
    assert steps["round1/synthesis"]["result"]["stats"]["requested"] == min(6, mined["n_errors"])
    val = {r["id"]: r for r in inputs.validation}
    for row in ees:  # the error's own paragraph and gold answer, a new question
        parent = val[row["parent_error_id"]]
        assert (row["context"], row["answer"], row["answer_start"]) == (
            parent["context"], parent["answer"], parent["answer_start"])

    final = datasets.load_dataset("parquet", data_files=str(run_dir / "final/train.parquet"), split="train")
    assert len(final) == len(seed) + len(ees) and "answer_start" in final.column_names
    assert report["metric"] == "f1" and report["complete"]
    assert all(r["test"] is not None and 0.0 <= r["test"] <= 1.0 for r in report["rounds"])
