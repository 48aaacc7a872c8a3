"""Config loading: defaults, overrides, and errors that name the field and the fix."""

from pathlib import Path

import pytest

from s3ray.config import ConfigError, config_from_dict, explain, load_config

REPO_CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", REPO_CONFIGS, ids=lambda p: p.name)
def test_every_example_config_loads(path):
    cfg = load_config(path)
    assert cfg.data.validation and cfg.run.output_dir


def test_quickstart_config_loads_with_paper_defaults():
    cfg = load_config("configs/sst2_quickstart.yaml")
    assert cfg.synthesis.rounds == 2
    assert cfg.teacher.sampling.temperature == 0.9
    assert cfg.uses_rationales  # classification writes rationales first


def test_overrides_are_typed():
    cfg = load_config("configs/sst2_quickstart.yaml", ["synthesis.rounds=1", "teacher.replicas=3"])
    assert cfg.synthesis.rounds == 1 and cfg.teacher.replicas == 3


@pytest.mark.parametrize(
    "raw, needle",
    [
        ({"data": {"validation": "v.jsonl"}, "teacher": {"engine": "vlm"}}, "teacher.engine: Input should be 'vllm'"),
        ({"data": {"validation": "v.jsonl"}, "synthesis": {"roundz": 2}}, "synthesis.roundz: unknown field"),
        ({}, "data: required field is missing"),
        ({"data": {"validation": "v.jsonl"}, "synthesis": {"rounds": -1}}, "synthesis.rounds"),
        ({"data": {"validation": "v.jsonl"}, "synthesis": {"num_rationales": 2, "rationales_per_example": 3}},
         "rationales_per_example (k) must be <="),
        ({"data": {"validation": "v.jsonl"}, "task": {"type": "qa"}}, "'classification', 'pair' or 'extractive_qa'"),
        ({"data": {"validation": "v.jsonl"}, "mining": {"concurrency": 0}},
         "mining.concurrency: must be a whole number of actors >= 1, or 'auto' (got 0)"),
    ],
)
def test_errors_name_the_field(raw, needle):
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw, "t.yaml")
    assert needle in str(e.value)


def test_bad_override_and_missing_file():
    with pytest.raises(ConfigError, match="expected section.field=value"):
        load_config("configs/sst2_quickstart.yaml", ["rounds"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/nope.yaml")


def test_every_field_is_documented():
    lines = explain()
    assert any(line.strip().startswith("teacher.sampling.temperature") for line in lines)
    undocumented = [line for line in lines if line.startswith("  ") and line.rstrip().endswith("):")]
    assert not undocumented


def test_explain_writes_types_as_people_do():
    lines = {line.split(" (")[0].strip(): line for line in explain()}
    assert "(int | Literal['auto'], default 'auto')" in lines["mining.concurrency"]
    assert "(str | None, default None)" in lines["ray.address"]
    assert "(int, default 0)" in lines["run.seed"]
