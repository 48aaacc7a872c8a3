"""Step names and typed step results: one place names the steps, the manifest round-trips their results."""

import dataclasses
import json

import pytest

from s3ray.config import config_from_dict
from s3ray.pipeline import steps
from s3ray.pipeline.rundir import RunDir
from s3ray.pipeline.s3 import StepFailed, StepRecorder, StopRun


def _cfg(rounds: int, equal_budget: bool = True):
    return config_from_dict({"data": {"validation": "v.jsonl"}, "synthesis": {"rounds": rounds},
                             "baselines": {"equal_budget": equal_budget}})


@pytest.mark.parametrize("name", ["rationales", "round0/synthesis", "round0/train", "round0/mine",
                                  "round2/synthesis", "round2/train", "baseline/equal_budget/synthesis",
                                  "baseline/equal_budget/train", "baseline/real_validation/train"])
def test_every_step_of_a_two_round_run_is_a_valid_stop_point(name):
    assert steps.check_step_name(name, _cfg(rounds=2)) == name


@pytest.mark.parametrize("name", ["round2/mine", "round3/synthesis", "round3/train", "round0/minee", "train",
                                  "baseline/equal_budget", ""])
def test_steps_a_run_never_records_are_refused_with_the_choices(name):
    with pytest.raises(ValueError, match="steps are: rationales, round0/synthesis"):
        steps.check_step_name(name, _cfg(rounds=2))


def test_the_run_order_follows_the_config():
    names = [s.name for s in steps.run_order(_cfg(rounds=1, equal_budget=False))]
    assert names == ["rationales", "round0/synthesis", "round0/train", "round0/mine", "round1/synthesis",
                     "round1/train", "baseline/real_validation/train", "baseline/s3_plus_real/train"]
    qa = config_from_dict({"task": {"type": "extractive_qa"}, "data": {"validation": "v.jsonl"}})
    assert steps.run_order(qa)[0].name == "round0/synthesis"  # no labels, no rationales


def test_a_recorded_result_comes_back_typed_and_older_keys_are_ignored():
    recorded = {"checkpoint": "students/round0/best", "best_epoch": 2, "val": {"accuracy": 0.5}, "history": [],
                "n_train": 10, "train_seconds": 1.5, "test": None, "written_by_an_older_s3ray": True}
    res = steps.train(0).load(recorded)
    assert isinstance(res, steps.StudentResult) and res.best_epoch == 2 and res.holdout_rows is None
    assert steps.train(1).name == "round1/train" and str(steps.mine(0)) == "round0/mine"


def _synth(rows: int) -> steps.SynthesisResult:
    return steps.SynthesisResult(path="rounds/round_0.parquet", rows=rows, stats={"requested": rows})


def test_the_recorder_runs_a_step_once_and_replays_its_typed_result(tmp_path):
    calls = []

    def work(n):
        calls.append(n)
        return _synth(n)

    run = RunDir(tmp_path / "run", {"x": 1}, resume=False)
    first = StepRecorder(run)(steps.synthesis(0), work, 7)
    run.close()  # a run directory has one driver at a time
    again = StepRecorder(RunDir(tmp_path / "run", {"x": 1}, resume=True))(steps.synthesis(0), work, 8)
    assert calls == [7] and again == first and isinstance(again, steps.SynthesisResult)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["steps"]["round0/synthesis"]["result"] == dataclasses.asdict(first)


def test_stop_after_pauses_after_recording_and_a_failed_step_is_not_recorded(tmp_path):
    run = RunDir(tmp_path / "run", {"x": 1}, resume=False)
    with pytest.raises(StopRun):
        StepRecorder(run, stop_after="round0/synthesis")(steps.synthesis(0), _synth, 3)
    assert run.done("round0/synthesis")

    def failing():
        raise StepFailed("3 of 4 teacher calls failed")

    with pytest.raises(StepFailed):
        StepRecorder(run)(steps.synthesis(1), failing)
    assert not run.done("round1/synthesis")


def test_a_synthesis_step_with_too_many_failed_calls_fails_before_it_is_recorded():
    from s3ray.pipeline.s3 import check_failed_calls
    from s3ray.synthesis.collect import SynthesisStats

    check_failed_calls(SynthesisStats(requested=100, failed_calls=5), 0.05, "seed synthesis")  # at the limit
    with pytest.raises(StepFailed, match=r"6 of 100 teacher calls failed .*max_failed_call_fraction=0.05"):
        check_failed_calls(SynthesisStats(requested=100, failed_calls=6), 0.05, "seed synthesis")


def _errors(n_pos: int, n_neg: int) -> list[dict]:
    return ([{"id": f"p{i}", "label": "positive"} for i in range(n_pos)]
            + [{"id": f"n{i}", "label": "negative"} for i in range(n_neg)])


def test_balanced_ees_gives_each_label_an_equal_quota_of_the_same_budget():
    from s3ray.synthesis.plan import balanced_counts

    # The quickstart's round 2: 319 errors on positive rows, 4 on negative ones.
    counts = balanced_counts(_errors(319, 4), ["negative", "positive"], 1, run_seed=0, round_=2)
    per_label = {"positive": 0, "negative": 0}
    for rid, n in counts.items():
        per_label["positive" if rid.startswith("p") else "negative"] += n
    assert per_label["positive"] == 323 // 2  # a seeded sample of the positive errors, one request each
    assert all(n == 1 for rid, n in counts.items() if rid.startswith("p"))
    assert per_label["negative"] == 4 * 4  # few errors: several rows each, at most max_factor per error
    assert counts == balanced_counts(_errors(319, 4), ["negative", "positive"], 1, run_seed=0, round_=2)
    assert counts != balanced_counts(_errors(319, 4), ["negative", "positive"], 1, run_seed=0, round_=3)

    # Balanced errors stay one request per error; the budget never grows.
    even = balanced_counts(_errors(50, 50), ["negative", "positive"], 1, run_seed=0, round_=1)
    assert len(even) == 100 and set(even.values()) == {1}
    assert sum(balanced_counts(_errors(7, 30), ["negative", "positive"], 2, 0, 1).values()) <= 37 * 2


def test_plan_ees_asks_the_balanced_number_of_rows_per_error_with_unique_ids():
    from s3ray.config import SamplingConfig, SynthesisConfig, TaskConfig
    from s3ray.synthesis.plan import plan_ees
    from s3ray.tasks import make_task

    task = make_task(TaskConfig(labels=["negative", "positive"]), ["negative", "positive"], SynthesisConfig())
    errors = [{"id": "a", "label": "negative", "text": "bad film"}, {"id": "b", "label": "positive", "text": "fun"}]
    planned = plan_ees(task, errors, 1, 1, SamplingConfig(), 0, counts={"a": 3})
    ids = [p.request.request_id for p in planned]
    assert ids == ["ees/round1/a/0", "ees/round1/a/1", "ees/round1/a/2"]
    assert {p.label for p in planned} == {"negative"} and all(p.parent_error_id == "a" for p in planned)


def test_min_steps_gives_a_student_on_few_rows_the_same_optimizer_steps():
    from s3ray.config import StudentConfig
    from s3ray.pipeline.s3 import student_epochs

    plain = StudentConfig(epochs=3, batch_size=32)
    assert student_epochs(plain, 100) == 3 == student_epochs(plain, 10_000)
    fair = StudentConfig(epochs=3, batch_size=32, min_steps=90)  # 90 steps: 3 epochs of 960 rows
    assert student_epochs(fair, 960) == 3
    assert student_epochs(fair, 320) == 9  # 10 steps per epoch
    assert student_epochs(fair, 5000) == 3  # never fewer than student.epochs
    assert student_epochs(StudentConfig(epochs=3, batch_size=32, min_steps=90, max_epochs=5), 64) == 5
