"""Step names and typed step results: one place names the steps, the manifest round-trips their results."""

import dataclasses
import json

import pytest

from s3ray.pipeline import steps
from s3ray.pipeline.rundir import RunDir
from s3ray.pipeline.s3 import StepFailed, StepRecorder, StopRun


@pytest.mark.parametrize("name", ["rationales", "round0/synthesis", "round0/train", "round0/mine",
                                  "round2/synthesis", "round2/train", "baseline/equal_budget/synthesis",
                                  "baseline/equal_budget/train", "baseline/real_validation/train"])
def test_every_step_of_a_two_round_run_is_a_valid_stop_point(name):
    assert steps.check_step_name(name, rounds=2) == name


@pytest.mark.parametrize("name", ["round2/mine", "round3/synthesis", "round3/train", "round0/minee", "train",
                                  "baseline/equal_budget", ""])
def test_steps_a_run_never_records_are_refused_with_the_choices(name):
    with pytest.raises(ValueError, match="steps are rationales"):
        steps.check_step_name(name, rounds=2)


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
