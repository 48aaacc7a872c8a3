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


def test_yaml_with_a_key_given_twice_is_refused(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  validation: a.jsonl\n  validation: b.jsonl\n")
    with pytest.raises(ConfigError, match=r"key 'validation' appears twice in one section \(lines 2 and 3\)"):
        load_config(p)
    p.write_text("data: {validation: a.jsonl}\nshared: &b {rounds: 1}\nsynthesis: {<<: *b, seed_examples: 4}\n"
                 "run: {seed: 1}\n")
    with pytest.raises(ConfigError, match="shared: unknown field"):  # anchors and merges still parse
        load_config(p)


def test_unknown_field_suggests_the_closest_and_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"data": {"validation": "v.jsonl", "validaton_size": 3}, "studnt": {}}, "t.yaml")
    msg = str(e.value)
    assert "data.validaton_size: unknown field" in msg and "did you mean 'validation_size'?" in msg
    assert "studnt: unknown field" in msg and "did you mean 'student'?" in msg
    assert "\n" not in msg


def test_config_that_is_not_utf8_or_lists_a_label_twice(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"data: {validation: v.jsonl}\nrun: {name: caf\xe9}\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"task.labels: names \['a'\] more than once"):
        config_from_dict({"data": {"validation": "v.jsonl"}, "task": {"labels": ["a", "b", "a"]}})


def test_a_config_with_a_base_changes_only_what_it_states(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("run: {name: a, seed: 4}\ndata: {validation: v.jsonl}\nstudent: {epochs: 7, batch_size: 8}\n")
    sub = tmp_path / "variants" / "b.yaml"
    sub.parent.mkdir()
    sub.write_text("base: ../base.yaml\nrun: {name: b}\nstudent: {epochs: 2}\n")
    cfg = load_config(sub, ["student.batch_size=16"])
    assert (cfg.run.name, cfg.run.seed, cfg.student.epochs, cfg.student.batch_size) == ("b", 4, 2, 16)
    sweep = load_config(Path(__file__).parents[1] / "configs/sst2_sweep.yaml")
    quick = load_config(Path(__file__).parents[1] / "configs/sst2_quickstart.yaml")
    assert sweep.run.seeds == [0, 1, 2] and sweep.synthesis == quick.synthesis and sweep.teacher == quick.teacher


def test_a_missing_or_looping_base_is_named(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("base: b.yaml\n")
    b.write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="leads back"):
        load_config(a)
    a.write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"base: .*nowhere.yaml not found"):
        load_config(a)
    a.write_text("base: [x]\n")
    with pytest.raises(ConfigError, match="the path of another config"):
        load_config(a)
