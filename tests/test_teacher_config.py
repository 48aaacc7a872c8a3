"""The teacher's config: engine settings nested per engine, old flat keys named with their new place."""

from __future__ import annotations

import pytest

from s3ray.config import ConfigError, config_from_dict, explain


def _load(teacher: dict):
    return config_from_dict({"data": {"validation": "data/sst2/validation.jsonl"}, "teacher": teacher})


def test_old_flat_keys_name_their_new_place():
    with pytest.raises(ConfigError) as err:
        _load({"gpu_memory_utilization": 0.4, "batch_size": 8})
    assert "teacher.gpu_memory_utilization moved to teacher.vllm.gpu_memory_utilization" in str(err.value)
    assert "teacher.batch_size moved to teacher.transformers.batch_size" in str(err.value)


def test_engine_args_pass_through_but_not_over_s3rays_own_fields():
    cfg = _load({"vllm": {"max_model_len": 512, "engine_args": {"max_num_seqs": 8}},
                 "transformers": {"batch_size": 4, "engine_args": {"attn_implementation": "eager"}}})
    assert cfg.teacher.vllm.engine_args == {"max_num_seqs": 8} and cfg.teacher.transformers.batch_size == 4
    with pytest.raises(ConfigError, match=r"teacher.vllm.engine_args.seed is set by s3ray: use run.seed"):
        _load({"vllm": {"engine_args": {"seed": 3}}})
    with pytest.raises(ConfigError, match=r"engine_args.trust_remote_code .*use teacher.trust_remote_code"):
        _load({"transformers": {"engine_args": {"trust_remote_code": True}}})


def test_dtype_is_one_of_the_allowed_values():
    with pytest.raises(ConfigError, match=r"teacher.dtype: Input should be 'bfloat16', 'float16' or 'float32'"):
        _load({"dtype": "fp8"})


def test_explain_lists_the_nested_engine_settings():
    lines = "\n".join(explain())
    for field in ("teacher.vllm.kv_cache_space_gb", "teacher.transformers.engine_args", "teacher.max_attempts",
                  "teacher.start_timeout_s", "teacher.request_timeout_s"):
        assert f"  {field} (" in lines


def test_two_converters_of_the_embedded_teacher_publish_one_folder_and_keep_the_first(tmp_path):
    """Two processes converting the GGUF at once on a fresh node: the second keeps the first's folder."""
    from s3ray.storage import publish_local_dir

    def publish_folder(tmp, dest):
        return publish_local_dir(tmp, dest, marker="config.json")  # as the teacher's conversion calls it

    dest = tmp_path / "smollm2-135m-instruct"
    first, second = tmp_path / "smollm2.tmp-a", tmp_path / "smollm2.tmp-b"
    for folder, who in ((first, "first"), (second, "second")):
        folder.mkdir()
        (folder / "config.json").write_text(who)
    assert publish_folder(first, dest) == dest and publish_folder(second, dest) == dest
    assert (dest / "config.json").read_text() == "first" and not first.exists() and not second.exists()
    # A destination that is in the way but unfinished is an error, not silently kept.
    third = tmp_path / "smollm2.tmp-c"
    third.mkdir()
    (third / "config.json").write_text("third")
    broken = tmp_path / "broken"
    (broken / "half").mkdir(parents=True)
    with pytest.raises(OSError):
        publish_folder(third, broken)
    assert third.exists()
