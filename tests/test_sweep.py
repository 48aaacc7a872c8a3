"""The sweep's aggregation, on run directories with known numbers."""

import json
import statistics

import pytest

from s3ray.config import config_from_dict
from s3ray.pipeline.sweep import seed_config, write_sweep_report


def _report(seed: int, s3_test: float, real_test: float | None, r1_val: float) -> dict:
    return {
        "run": f"toy (seed {seed})", "task": "classification", "metric": "accuracy", "complete": True,
        "comparison": [
            {"method": "S3 after 1 round(s)", "train_rows": 100 + seed, "val": 0.7, "test": s3_test},
            {"method": "real validation rows only", "train_rows": 80, "val": 0.8, "test": real_test},
        ],
        "rounds": [
            {"round": 0, "total_rows": 50, "val": 0.6, "test": 0.55, "errors_mined": 10, "teacher_tokens": 1000},
            {"round": 1, "total_rows": 100 + seed, "val": r1_val, "test": s3_test, "errors_mined": None,
             "teacher_tokens": 900 + seed},
        ],
    }


def test_the_sweep_report_gives_mean_and_sample_std_per_student_and_round(tmp_path):
    numbers = {0: (0.70, 0.80, 0.71), 1: (0.74, None, 0.73), 2: (0.78, 0.84, 0.78)}
    for seed, (s3, real, r1) in numbers.items():
        (tmp_path / f"seed{seed}").mkdir()
        (tmp_path / f"seed{seed}" / "report.json").write_text(json.dumps(_report(seed, s3, real, r1)))
    agg = write_sweep_report(tmp_path, [0, 1, 2])

    s3 = agg["students"][0]
    assert s3["test"]["mean"] == pytest.approx(0.74) and s3["test"]["n"] == 3
    assert s3["test"]["std"] == pytest.approx(statistics.stdev([0.70, 0.74, 0.78]))
    real = agg["students"][1]  # a seed without a number is left out, not counted as zero
    assert real["test"]["n"] == 2 and real["test"]["mean"] == pytest.approx(0.82)
    assert agg["rounds"][1]["val"]["mean"] == pytest.approx((0.71 + 0.73 + 0.78) / 3)
    assert agg["rounds"][1]["teacher_tokens"]["mean"] == pytest.approx(901)
    assert agg["rounds"][0]["val"]["std"] == 0.0 and agg["run"] == "toy"

    md = (tmp_path / "sweep_report.md").read_text()
    assert "74.00 ± 4.00" in md and "| 1 | 74.00 | – |" in md
    assert json.loads((tmp_path / "sweep_report.json").read_text())["seeds"] == [0, 1, 2]


def test_a_missing_seed_run_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="seed1"):
        write_sweep_report(tmp_path, [1])


def test_each_seed_gets_its_own_run_directory_and_seed():
    cfg = config_from_dict({"run": {"output_dir": "runs/sw", "seed": 0}, "data": {"validation": "x.jsonl"}})
    one = seed_config(cfg, 2)
    assert one.run.seed == 2 and one.run.output_dir.endswith("runs/sw/seed2") and cfg.run.seed == 0


def test_the_ablation_counts_tokens_until_a_round_reaches_the_target():
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("ablation", REPO / "scripts" / "ablation.py")
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    rounds = [{"test": {"mean": 0.6}, "teacher_tokens": {"mean": 100.0}},
              {"test": {"mean": 0.75}, "teacher_tokens": {"mean": 50.0}},
              {"test": {"mean": 0.72}, "teacher_tokens": {"mean": 50.0}}]
    assert ablation.tokens_to_reach(rounds, 0.72) == 150.0  # reached in round 1, before the last round
    assert ablation.tokens_to_reach(rounds, 0.8) is None
    rounds = [{**r, "test": {**r["test"], "std": 0.01}} for r in rounds]
    md = ablation.table({"sst2": {"plain": {"rounds": rounds}}})
    assert "| plain | 60.00 ± 1.00 | 75.00 ± 1.00 | 72.00 ± 1.00 | 150 |" in md


def test_resume_continues_the_seeds_that_started_and_starts_the_others(tmp_path):
    from s3ray.pipeline.sweep import seed_resumes

    started, copied, absent = tmp_path / "seed0", tmp_path / "seed1", tmp_path / "seed2"
    started.mkdir()
    (started / "manifest.json").write_text("{}")
    copied.mkdir()  # scripts/ablation.py puts a sibling variant's teacher cache here before the run starts
    (copied / "teacher_cache.sqlite").write_bytes(b"")
    assert [seed_resumes(str(d), True) for d in (started, copied, absent)] == [True, False, False]
    assert not any(seed_resumes(str(d), False) for d in (started, copied, absent))
