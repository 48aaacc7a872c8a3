"""The sweep's aggregation, on run directories with known numbers."""

import json
import shutil
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
    assert "| real validation rows only | 80 ± 0 | 80.00 ± 0.00 | 82.00 (2 of 3 seeds) |" in md
    assert json.loads((tmp_path / "sweep_report.json").read_text())["seeds"] == [0, 1, 2]


def test_the_sweep_report_gives_the_secondary_metric_beside_the_main_one(tmp_path):
    for seed, em in ((0, 0.01), (1, 0.03)):  # extractive QA: F1 first, exact match beside it
        report = {**_report(seed, 0.06, None, 0.05), "metric": "f1", "secondary_metric": "exact_match"}
        report["comparison"][0]["test_secondary"] = em
        (tmp_path / f"seed{seed}").mkdir()
        (tmp_path / f"seed{seed}" / "report.json").write_text(json.dumps(report))
    agg = write_sweep_report(tmp_path, [0, 1])
    assert agg["students"][0]["test_secondary"]["mean"] == pytest.approx(0.02)
    md = (tmp_path / "sweep_report.md").read_text()
    assert "| method | train rows | validation f1 | test f1 | test exact_match |" in md
    assert "| 6.00 ± 0.00 | 2.00 ± 1.41 |" in md


def test_a_missing_seed_run_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="seed1"):
        write_sweep_report(tmp_path, [1])


def test_s3ray_report_gathers_seed_runs_made_apart_into_a_sweep_report(tmp_path, capsys):
    from s3ray.cli import main

    sweep = tmp_path / "gathered"
    for seed, s3 in ((0, 0.70), (2, 0.78)):  # seed 1 not copied in yet: the spread is over the ones present
        (sweep / f"seed{seed}").mkdir(parents=True)
        (sweep / f"seed{seed}" / "report.json").write_text(json.dumps(_report(seed, s3, None, 0.7)))
    (sweep / "seed1").mkdir()  # a seed folder without its report.json is not counted
    (sweep / "notes").mkdir()
    assert main(["report", str(sweep)]) == 0
    assert "seeds 0, 2" in capsys.readouterr().out
    agg = json.loads((sweep / "sweep_report.json").read_text())
    assert agg["seeds"] == [0, 2] and agg["students"][0]["test"]["mean"] == pytest.approx(0.74)
    assert main(["report", str(tmp_path / "empty")]) != 0  # neither a run nor a sweep: the run error, as before
    assert "no manifest.json here" in capsys.readouterr().err


def test_each_seed_gets_its_own_run_directory_and_seed():
    cfg = config_from_dict({"run": {"output_dir": "runs/sw", "seed": 0}, "data": {"validation": "x.jsonl"}})
    one = seed_config(cfg, 2)
    assert one.run.seed == 2 and one.run.output_dir.endswith("runs/sw/seed2") and cfg.run.seed == 0
    remote = config_from_dict({"run": {"output_dir": "s3://bucket/sw/"}, "data": {"validation": "x.jsonl"}})
    assert seed_config(remote, 1).run.output_dir == "s3://bucket/sw/seed1"  # a URI stays a URI


def _ablation_script():
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("ablation", REPO / "scripts" / "ablation.py")
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    return ablation


def test_the_ablation_counts_tokens_until_a_round_reaches_the_target():
    ablation = _ablation_script()
    rounds = [{"test": {"mean": 0.6}, "teacher_tokens": {"mean": 100.0}},
              {"test": {"mean": 0.75}, "teacher_tokens": {"mean": 50.0}},
              {"test": {"mean": 0.72}, "teacher_tokens": {"mean": 50.0}}]
    assert ablation.tokens_to_reach(rounds, 0.72) == 150.0  # reached in round 1, before the last round
    assert ablation.tokens_to_reach(rounds, 0.8) is None
    rounds = [{**r, "test": {**r["test"], "std": 0.01}} for r in rounds]
    md = ablation.table({"sst2": {"plain": {"rounds": rounds}}})
    assert "| plain | – | 60.00 ± 1.00 | 75.00 ± 1.00 | 72.00 ± 1.00 | 150 | – | – |" in md
    # Validation falls counted per seed and round; every student's spread; the EES label balance.
    per_seed = {0: {"rounds": [{"val": 0.6}, {"val": 0.58}, {"val": 0.7}], "total_seconds": 600},
                1: {"rounds": [{"val": 0.6}, {"val": 0.65}, {"val": None}], "total_seconds": 1200}}
    students = [{"method": "S3 after 2 round(s)", "test": {"mean": 0.72, "std": 0.02}}]
    md = ablation.table({"sst2": {"balanced": {"rounds": rounds, "per_seed": per_seed, "students": students,
                                               "ees_majority_share": 0.55}}})
    assert "| – | 1 of 3 | 55% |" in md and "| balanced | 72.00 ± 2.00 | 15 |" in md


def test_the_ablation_table_only_tabulates_finished_seed_runs_and_runs_nothing(tmp_path, monkeypatch):
    ablation = _ablation_script()
    for variant, seeds in (("plain", (0, 1, 2)), ("balanced", (0, 1))):
        for seed in seeds:
            run = tmp_path / "runs" / "rte" / variant / f"seed{seed}"
            run.mkdir(parents=True)
            report = _report(seed, 0.5 + seed / 100, None, 0.6)
            report["complete"] = not (variant == "balanced" and seed == 1)  # killed mid-run: not tabulated
            (run / "report.json").write_text(json.dumps(report))
    monkeypatch.setattr(ablation, "run_variant", lambda *a, **k: pytest.fail("--table-only ran a sweep"))
    doc = tmp_path / "ablation.md"
    monkeypatch.setattr("sys.argv", ["ablation.py", "--tasks", "rte,qnli", "--variants", "plain,balanced,plain_fair",
                                     "--out", str(tmp_path / "runs"), "--doc", str(doc), "--table-only"])
    assert ablation.main() == 0
    md = doc.read_text()
    assert "| plain | 0, 1, 2 | 55.00 ± 0.00 | 51.00 ± 1.00 |" in md
    assert "| balanced | 0 | 55.00 | 50.00 |" in md  # one seed: its figures, no spread
    assert "| plain_fair |" not in md and "## qnli" not in md  # nothing finished: no row, no section
    # How the cells come about, not the command line of the call that last wrote the table.
    assert "How the cells were run: `python scripts/ablation.py --tasks T --variants V --seeds S`" in md
    assert "--tasks rte,qnli" not in md
    assert json.loads(doc.with_suffix(".json").read_text())["rte"]["balanced"]["seeds"] == [0]


def test_the_ablation_record_adds_new_seed_runs_to_the_committed_ones(tmp_path, monkeypatch):
    """Seeds run on another day (their run directories gone) stay in the table through the committed .json."""
    ablation = _ablation_script()
    doc, runs = tmp_path / "ablation.md", tmp_path / "runs"

    def finish(task: str, variant: str, seed: int, s3: float, by_label: dict) -> None:
        run = runs / task / variant / f"seed{seed}"
        run.mkdir(parents=True)
        report = _report(seed, s3, None, 0.6)
        report["rounds"][1]["new_by_label"] = by_label
        (run / "report.json").write_text(json.dumps({**report, "total_seconds": 600, "generation": ["dropped"]}))

    finish("rte", "plain", 0, 0.50, {"entailment": 30, "not_entailment": 10})
    finish("rte", "plain", 1, 0.54, {"entailment": 20, "not_entailment": 20})
    legacy = {"seeds": [0, 1, 2], "rounds": [{"test": {"mean": 0.7, "std": 0.01, "n": 3},
                                              "teacher_tokens": {"mean": 70}}],
              "val_fell": [2, 6], "minutes_per_seed": 30.0}  # recorded before per-seed reports were kept
    doc.with_suffix(".json").write_text(json.dumps({"qnli": {"plain": legacy}}))
    argv = ["ablation.py", "--tasks", "rte", "--variants", "plain", "--out", str(runs), "--doc", str(doc),
            "--table-only"]
    monkeypatch.setattr("sys.argv", argv)
    assert ablation.main() == 0
    record = json.loads(doc.with_suffix(".json").read_text())
    assert record["rte"]["plain"]["seeds"] == [0, 1] and record["qnli"]["plain"] == legacy
    assert "generation" not in record["rte"]["plain"]["per_seed"]["0"]  # the record keeps what re-aggregates
    assert record["rte"]["plain"]["ees_majority_share"] == 0.625  # 75% and 50% of the round-1 rows

    shutil.rmtree(runs)  # seeds 0 and 1 now live only in the record; seed 2 runs on another machine
    finish("rte", "plain", 2, 0.58, {"entailment": 10, "not_entailment": 30})
    monkeypatch.setattr("sys.argv", argv[:5] + ["--seeds", "0,1,2"] + argv[5:])
    assert ablation.main() == 0
    md = doc.read_text()
    assert "| plain | 0, 1, 2 | 55.00 ± 0.00 | 54.00 ± 4.00 |" in md
    assert "| plain | 0, 1, 2 | 70.00 ± 1.00 | 70 | 2 of 6 | – |" in md  # the legacy cell, as recorded
    assert json.loads(doc.with_suffix(".json").read_text())["rte"]["plain"]["seeds"] == [0, 1, 2]


def test_an_ablation_call_keeps_what_a_concurrent_call_recorded_while_it_ran(tmp_path, monkeypatch):
    """Two calls side by side (RTE and QNLI, hours each): the one that finishes last must not write back the
    record as it was when it started, dropping the other's seed."""
    ablation = _ablation_script()
    doc, runs = tmp_path / "ablation.md", tmp_path / "runs"
    doc.with_suffix(".json").write_text(json.dumps({}))

    def run_qnli_while_rte_finishes(task, variant, seeds, out, extra=()):
        # The other call (RTE seed 0) finishes and records its seed while this one is still running.
        (runs / "rte" / "plain" / "seed0").mkdir(parents=True)
        (runs / "rte" / "plain" / "seed0" / "report.json").write_text(json.dumps(_report(0, 0.52, None, 0.6)))
        monkeypatch.setattr("sys.argv", ["ablation.py", "--tasks", "rte", "--variants", "plain", "--seeds", "0",
                                         "--out", str(runs), "--doc", str(doc), "--table-only"])
        assert ablation.main() == 0
        # Then this call's own run (QNLI seed 0) finishes.
        (out / task / variant / "seed0").mkdir(parents=True)
        (out / task / variant / "seed0" / "report.json").write_text(json.dumps(_report(0, 0.55, None, 0.6)))

    monkeypatch.setattr(ablation, "run_variant", run_qnli_while_rte_finishes)
    monkeypatch.setattr("sys.argv", ["ablation.py", "--tasks", "qnli", "--variants", "plain", "--seeds", "0",
                                     "--out", str(runs), "--doc", str(doc)])
    assert ablation.main() == 0
    record = json.loads(doc.with_suffix(".json").read_text())
    assert record["rte"]["plain"]["seeds"] == [0] and record["qnli"]["plain"]["seeds"] == [0]
    assert "## rte" in doc.read_text() and "## qnli" in doc.read_text()


def test_an_aggregates_only_cell_stays_until_reruns_of_all_its_seeds_are_recorded(tmp_path, monkeypatch):
    """Rerunning an old cell one seed per call (or machine) never shrinks it to fewer seeds, and loses no rerun."""
    ablation = _ablation_script()
    doc, runs = tmp_path / "ablation.md", tmp_path / "runs"
    legacy = {"seeds": [0, 1], "rounds": [{"test": {"mean": 0.7, "std": 0.01, "n": 2}, "teacher_tokens": {"mean": 70}}],
              "val_fell": [1, 4]}
    doc.with_suffix(".json").write_text(json.dumps({"qnli": {"plain": legacy}}))

    def rerun(seed: int, s3: float) -> None:
        (runs / "qnli" / "plain" / f"seed{seed}").mkdir(parents=True)
        (runs / "qnli" / "plain" / f"seed{seed}" / "report.json").write_text(json.dumps(_report(seed, s3, None, 0.6)))
        monkeypatch.setattr("sys.argv", ["ablation.py", "--tasks", "qnli", "--variants", "plain", "--seeds",
                                         str(seed), "--out", str(runs), "--doc", str(doc), "--table-only"])
        assert ablation.main() == 0
        shutil.rmtree(runs)  # each rerun ran on a machine whose run directories are gone afterwards

    rerun(0, 0.50)
    kept = json.loads(doc.with_suffix(".json").read_text())["qnli"]["plain"]
    assert kept["rounds"] == legacy["rounds"] and sorted(kept["reruns"]) == ["0"] and "per_seed" not in kept
    assert "| plain | 0, 1 (rerun so far: 0) | 70.00 ± 1.00 |" in doc.read_text()
    rerun(1, 0.54)
    cell = json.loads(doc.with_suffix(".json").read_text())["qnli"]["plain"]
    assert sorted(cell["per_seed"]) == ["0", "1"] and "reruns" not in cell and "val_fell" not in cell
    assert "| plain | 0, 1 | 55.00 ± 0.00 | 52.00 ± 2.83 |" in doc.read_text()


def test_resume_continues_the_seeds_that_started_and_starts_the_others(tmp_path):
    from s3ray.pipeline.sweep import seed_resumes

    started, copied, absent = tmp_path / "seed0", tmp_path / "seed1", tmp_path / "seed2"
    started.mkdir()
    (started / "manifest.json").write_text("{}")
    copied.mkdir()  # scripts/ablation.py puts a sibling variant's teacher cache here before the run starts
    (copied / "teacher_cache.sqlite").write_bytes(b"")
    assert [seed_resumes(str(d), True) for d in (started, copied, absent)] == [True, False, False]
    assert not any(seed_resumes(str(d), False) for d in (started, copied, absent))


@pytest.mark.slow
def test_seeds_run_side_by_side_as_ray_tasks_each_with_its_own_run_and_cache(tmp_path, tiny_teacher_dir,
                                                                             tiny_student_dir):
    """`s3ray sweep --parallel 2` on a local cluster of 8 logical CPUs: both seeds run at once (their step
    spans overlap), each in its own run directory with its own teacher cache and its fixed CPU share, from
    the driver's working directory (the config's data paths are relative); --resume redoes nothing."""
    import subprocess
    import sys

    from fuzz_driver import REPO, driver_env, write_config

    out = tmp_path / "sweep"
    cfg_path = write_config(tmp_path / "cfg.yaml", out, tiny_teacher_dir, tiny_student_dir)
    cfg = json.loads(cfg_path.read_text())
    cfg["data"].update(validation="data/sst2/validation.jsonl", test="data/sst2/test.jsonl")
    cfg["synthesis"]["rounds"] = 0  # rationales, seed rows, one student: the mechanics, not the loop
    cfg["baselines"] = {"equal_budget": False, "real_validation": False, "s3_plus_real": False}
    cfg["ray"] = {"num_cpus": 8}
    cfg_path.write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "s3ray.cli", "sweep", str(cfg_path), "--seeds", "0,1", "--parallel", "2"]
    env = driver_env(tmp_path, "sweep")
    done = subprocess.run(cmd, cwd=REPO, env=env, check=False, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 seed runs at once, 3 CPU(s) per student worker each" in (out / "sweep.log").read_text()

    spans, manifests = [], {}
    for seed in (0, 1):
        run = out / f"seed{seed}"
        manifests[seed] = json.loads((run / "manifest.json").read_text())
        config = manifests[seed]["config"]
        assert config["run"]["seed"] == seed and config["student"]["cpus_per_worker"] == 3
        assert (run / "teacher_cache.sqlite").stat().st_size > 0 and "round0/synthesis" in (run / "run.log").read_text()
        steps = manifests[seed]["steps"].values()
        spans.append((min(s["finished"] - s["seconds"] for s in steps), max(s["finished"] for s in steps)))
    assert max(a for a, _ in spans) < min(b for _, b in spans)  # the two runs were in flight at once
    agg = json.loads((out / "sweep_report.json").read_text())
    assert agg["seeds"] == [0, 1] and agg["students"][0]["test"]["n"] == 2 and agg["complete"]

    again = subprocess.run(cmd + ["--resume"], check=False, cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    for seed in (0, 1):
        after = json.loads((out / f"seed{seed}" / "manifest.json").read_text())["steps"]
        assert {k: v["finished"] for k, v in after.items()} == \
               {k: v["finished"] for k, v in manifests[seed]["steps"].items()}


def test_run_with_run_seeds_is_the_sweep_and_bad_settings_are_named(tmp_path, capsys):
    from s3ray.cli import main

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps({"run": {"output_dir": str(tmp_path / "out"), "seeds": [0, 1]},
                               "data": {"validation": "data/sst2/validation.jsonl"}}))
    assert main(["run", str(cfg), "--stop-after", "round0/train"]) == 2
    assert "not with run.seeds" in capsys.readouterr().err
    assert main(["sweep", str(cfg), "--parallel", "0"]) == 2
    assert "run.parallel_seeds" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything started


def test_the_ablation_copies_a_cache_that_a_running_sibling_still_writes(tmp_path):
    import importlib.util
    import sqlite3

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("ablation", REPO / "scripts" / "ablation.py")
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    live = sqlite3.connect(tmp_path / "live.sqlite")
    live.execute("PRAGMA journal_mode=WAL")
    live.execute("PRAGMA wal_autocheckpoint=0")  # every row stays in the -wal file, as in a running sibling
    live.execute("CREATE TABLE t (k TEXT)")
    live.executemany("INSERT INTO t VALUES (?)", [(str(i),) for i in range(100)])
    live.commit()
    ablation.copy_cache(tmp_path / "live.sqlite", tmp_path / "copy.sqlite")
    live.close()
    with sqlite3.connect(tmp_path / "copy.sqlite") as copy:
        assert copy.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 100


def _finetune_experiment_script():
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("finetune_experiment", REPO / "scripts" / "finetune_experiment.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def _ft_arm(test_acc: float, rows: int, agreement: float | None = None) -> dict:
    steps = {"finetune": {"result": {"skipped": "training.method=none"}, "seconds": 0.0},
             "student": {"result": {"n_train": rows, "best_epoch": 2, "val_metrics": {"accuracy": 0.7},
                                    "test_metrics": {"accuracy": test_acc, "macro_f1": test_acc - 0.01}},
                         "seconds": 30.0}}
    if agreement is not None:
        steps["annotate"] = {"result": {"agreement": agreement, "agreement_kept": agreement, "coverage": 0.5,
                                        "n": 2 * rows}, "seconds": 100.0}
    return {"command": "s3ray finetune configs/finetune/sst2-smollm2-experiment.yaml --resume", "steps": steps}


def test_the_finetune_experiment_record_keeps_seed_0_and_adds_seeds_run_later(tmp_path):
    """A record written before --seeds is seed 0; a seed finished later (in its own seed<S> folders) adds to it,
    and the report gives each arm's mean ± std over the seeds that finished it."""
    script = _finetune_experiment_script()
    doc, out = tmp_path / "ft.md", tmp_path / "runs"
    old = {"gold-125": _ft_arm(0.70, 125), "ft-annotate": _ft_arm(0.50, 900, agreement=0.54)}
    doc.with_suffix(".json").write_text(json.dumps({"meta": {}, "results": {"sst2": old}}))
    finished = out / "sst2" / "seed1" / "gold-125"  # seed 1's gold-125 ran elsewhere; only its files are here
    finished.mkdir(parents=True)
    arm = _ft_arm(0.74, 125)
    (finished / "report.json").write_text("{}")
    (finished / "manifest.json").write_text(json.dumps({
        "steps": arm["steps"], "config": {"data": {"pool_size": None}, "generate": {"per_label": 500}}}))

    assert script.main(["--collect", "--tasks", "sst2", "--seeds", "1", "--arms", "gold-125,ft-generate",
                        "--out", str(out), "--doc", str(doc)]) == 0
    results = json.loads(doc.with_suffix(".json").read_text())["results"]["sst2"]
    assert sorted(results) == ["0", "1"] and results["0"] == old  # seed 0 kept as recorded
    assert results["1"]["gold-125"]["steps"]["student"]["result"]["n_train"] == 125
    pending = results["1"]["ft-generate"]  # not run yet: its command is seed 1's, on seed 1's fine-tune
    assert "unfinished" in pending and "--set run.seed=1" in pending["command"]
    assert f"model.path={out / 'sst2' / 'seed1' / 'ft-annotate' / 'export'}" in pending["command"]
    md = doc.read_text()
    assert "| gold-125 | 72.00 ± 2.83 | 71.00 ± 2.83 | 125 ± 0 | — |" in md
    assert "| ft-annotate | 50.00 (1 of 2 seeds) | 49.00 (1 of 2 seeds) | 900 (1 of 2 seeds) | 54.00 (1 of 2 seeds) |" in md
    assert "### sst2, seed 0" in md and "### sst2, seed 1" in md and "**unfinished**" in md


def test_the_finetune_experiment_record_keeps_paths_under_the_repository_relative(tmp_path, monkeypatch):
    """The record is committed: a run under the repository is recorded by its relative path, not this machine's."""
    script = _finetune_experiment_script()
    monkeypatch.setattr(script, "REPO", tmp_path)
    doc, run_dir = tmp_path / "docs" / "ft.md", tmp_path / "runs" / "sst2" / "seed0" / "gold-125"
    doc.parent.mkdir()
    run_dir.mkdir(parents=True)
    arm = _ft_arm(0.7, 125)
    arm["steps"]["student"]["result"]["checkpoint"] = str(run_dir / "student" / "checkpoint")
    (run_dir / "report.json").write_text("{}")
    (run_dir / "manifest.json").write_text(json.dumps({
        "steps": arm["steps"], "config": {"data": {"pool_size": None}, "generate": {"per_label": 500}}}))

    assert script.main(["--collect", "--tasks", "sst2", "--seeds", "0", "--arms", "gold-125",
                        "--out", str(tmp_path / "runs"), "--doc", "docs/ft.md"]) == 0
    recorded = doc.with_suffix(".json").read_text()
    assert str(tmp_path) not in recorded
    gold = json.loads(recorded)["results"]["sst2"]["0"]["gold-125"]
    assert gold["run_dir"] == "runs/sst2/seed0/gold-125"
    assert gold["steps"]["student"]["result"]["checkpoint"] == "runs/sst2/seed0/gold-125/student/checkpoint"


def test_a_finetune_experiment_call_keeps_what_a_concurrent_call_recorded_while_it_ran(tmp_path, monkeypatch):
    """Seeds 1 and 2 run as two calls side by side (hours each): each arm the other call finishes in the
    meantime stays in the record."""
    script = _finetune_experiment_script()
    doc, out = tmp_path / "ft.md", tmp_path / "runs"
    doc.with_suffix(".json").write_text(json.dumps({"meta": {}, "results": {"sst2": {"0": {"gold-125": _ft_arm(0.7, 125)}}}}))

    def arm_while_the_other_call_records(task, arm, out_, sizes, seed=0, collect_only=False):
        record = json.loads(doc.with_suffix(".json").read_text())  # the other call (seed 2) finishes an arm
        record["results"]["sst2"].setdefault("2", {})[arm] = _ft_arm(0.8, 125)
        doc.with_suffix(".json").write_text(json.dumps(record))
        return _ft_arm(0.74, 125)

    monkeypatch.setattr(script, "run_arm", arm_while_the_other_call_records)
    assert script.main(["--tasks", "sst2", "--seeds", "1", "--arms", "gold-125", "--out", str(out),
                        "--doc", str(doc)]) == 0
    results = json.loads(doc.with_suffix(".json").read_text())["results"]["sst2"]
    assert sorted(results) == ["0", "1", "2"] and all("gold-125" in results[s] for s in results)
    assert "72.00 ± 2.83" not in doc.read_text() and "| gold-125 | 74.67" in doc.read_text()  # over 3 seeds
