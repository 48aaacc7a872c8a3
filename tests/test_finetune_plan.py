"""The memory calculator against DeepSpeed's own estimators, exact parameter counts, presets and --plan."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from s3ray.config import ConfigError
from s3ray.finetune.config import finetune_config_from_dict, load_finetune_config, require_fit
from s3ray.finetune.plan import Setting, estimate, nearest_fit
from s3ray.finetune.shape import GPT_NEOX_20B, ModelShape, shape_from_hf_config

REPO = Path(__file__).resolve().parents[1]
TINY = ModelShape(arch="gpt_neox", layers=2, hidden=64, heads=2, vocab=512, intermediate=256, max_positions=128)


def _meta_counts(shape: ModelShape) -> tuple[int, int]:
    cfg = GPTNeoXConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                        num_attention_heads=shape.heads, intermediate_size=shape.intermediate,
                        max_position_embeddings=shape.max_positions, tie_word_embeddings=False)
    with torch.device("meta"):
        model = GPTNeoXForCausalLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


@pytest.mark.parametrize("shape", [GPT_NEOX_20B, TINY], ids=["neox20b", "tiny"])
def test_param_counts_match_the_built_architecture(shape):
    total, largest = _meta_counts(shape)
    assert shape.total_params() == total
    assert shape.largest_layer_params() == largest
    if shape is GPT_NEOX_20B:
        assert total == 20_554_567_680  # the published GPT-NeoX-20B count


def _gpu_states(plan) -> int:
    return sum(plan.gpu[k] for k in ("params", "grads", "optimizer"))


@pytest.mark.parametrize("shape", [GPT_NEOX_20B, TINY], ids=["neox20b", "tiny"])
@pytest.mark.parametrize("gpus,nodes", [(1, 1), (8, 1), (8, 2)])
def test_zero3_model_states_agree_with_deepspeed(shape, gpus, nodes):
    for off_opt, off_par in [(False, False), (True, False), (True, True)]:
        for zero_init in (True, False):
            s = Setting(zero_stage=3, offload_optimizer=off_opt, offload_params=off_par, gpus_per_node=gpus,
                        nodes=nodes, zero_init=zero_init)
            plan = estimate(shape, s)
            cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
                shape.total_params(), shape.largest_layer_params(), num_gpus_per_node=gpus, num_nodes=nodes,
                cpu_offload=off_opt, cpu_offload_params=off_par, zero_init=zero_init)
            assert abs(_gpu_states(plan) - gpu) <= 2, (off_opt, off_par, zero_init)
            assert abs(plan.cpu_per_node - cpu) <= 2, (off_opt, off_par, zero_init)


@pytest.mark.parametrize("shape", [GPT_NEOX_20B, TINY], ids=["neox20b", "tiny"])
@pytest.mark.parametrize("gpus,nodes", [(1, 1), (8, 1), (8, 2)])
def test_zero2_model_states_agree_with_deepspeed(shape, gpus, nodes):
    for off in (False, True):
        plan = estimate(shape, Setting(zero_stage=2, offload_optimizer=off, gpus_per_node=gpus, nodes=nodes))
        cpu, gpu = estimate_zero2_model_states_mem_needs(
            shape.total_params(), num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=off)
        assert abs(_gpu_states(plan) - gpu) <= 2
        assert abs(plan.cpu_per_node - cpu) <= 2


def test_neox20b_fits_8_gpus_not_1_and_names_the_nearest_fit():
    assert estimate(GPT_NEOX_20B, Setting(gpus_per_node=8)).fits
    one = Setting(gpus_per_node=1, cpu_memory_gib=256)
    assert not estimate(GPT_NEOX_20B, one).fits
    changes, plan = nearest_fit(GPT_NEOX_20B, one)
    assert plan.fits and changes
    # Offloading 20B of optimizer states needs ~480 GiB of host memory: with 256 GiB the fix is elsewhere.
    assert plan.cpu_per_node <= 256 * 2**30
    # Without activation checkpointing a 2048-token micro-batch of 8 cannot fit one GPU; checkpointing is the
    # cheapest fix when the model states already fit.
    s = Setting(gpus_per_node=8, nodes=2, micro_batch=8, activation_checkpointing=False)
    assert not estimate(GPT_NEOX_20B, s).fits
    assert nearest_fit(GPT_NEOX_20B, s)[0][0] == "activation_checkpointing=true"


def test_lora_counts_and_fits_one_gpu():
    s = Setting(zero_stage=0, lora_rank=16, gpus_per_node=1)
    plan = estimate(GPT_NEOX_20B, s)
    assert plan.trainable_params == 44 * 16 * (6144 + 3 * 6144)
    assert plan.fits and plan.gpu["params"] >= 2 * GPT_NEOX_20B.total_params()
    with pytest.raises(ValueError, match="not in gpt_neox"):
        GPT_NEOX_20B.lora_params(8, ["q_proj"])


def test_shape_from_hf_config_llama_counts_like_the_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    assert shape_from_hf_config(cfg).total_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["neox20b-zero3-8gpu", "neox20b-zero3-16gpu", "neox20b-offload-2gpu",
                                  "neox20b-lora-1gpu"])
def test_presets_fit(name):
    cfg = load_finetune_config(REPO / "configs" / "finetune" / f"{name}.yaml")
    plan, _ = require_fit(cfg)
    assert plan.fits


def test_a_combination_that_does_not_fit_is_refused_with_numbers_and_the_fix():
    cfg = load_finetune_config(REPO / "configs" / "finetune" / "neox20b-zero3-8gpu.yaml",
                               ["hardware.gpus_per_node=1"])
    with pytest.raises(ConfigError, match=r"(?s)needs \d+\.\d GiB per GPU.*nearest setting that fits"):
        require_fit(cfg)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="training.zero_stag"):
        finetune_config_from_dict({"model": {"preset": "gpt-neox-20b"}, "training": {"zero_stag": 3}})
    with pytest.raises(ConfigError, match="offload_params needs"):
        finetune_config_from_dict({"model": {"preset": "gpt-neox-20b"},
                                   "training": {"zero_stage": 2, "offload_params": True}})
    with pytest.raises(ConfigError, match="model.path"):
        finetune_config_from_dict({"model": {}})
    with pytest.raises(ConfigError, match="run.output_dir: 's3://b/ft': a fine-tune writes .* filesystem path"):
        finetune_config_from_dict({"model": {"preset": "gpt-neox-20b"}, "run": {"output_dir": "s3://b/ft"}})


def test_cli_plan_prints_plan_and_deepspeed_config():
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-m", "s3ray.cli", "finetune", str(REPO / "configs/finetune/neox20b-zero3-16gpu.yaml"),
         "--plan"], check=False, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "FITS" in out.stdout and '"stage": 3' in out.stdout and '"train_batch_size": 64' in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "s3ray.cli", "finetune", str(REPO / "configs/finetune/neox20b-zero3-16gpu.yaml"),
         "--plan", "--set", "hardware.nodes=1", "--set", "hardware.gpus_per_node=1"],
        check=False, capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 1 and "DOES NOT FIT" in bad.stdout and "nearest setting" in bad.stdout


def test_recipe_preflight_names_data_problems_before_training(tmp_path, tiny_teacher_dir):
    from s3ray.data.load import DataError
    from s3ray.finetune.recipe import preflight

    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "a fine film", "label": "positive"}\n{"text": "dull", "label": "negative"}\n')
    base = {"run": {"output_dir": str(tmp_path / "run")}, "task": {"labels": ["negative", "positive"]},
            "model": {"path": str(tiny_teacher_dir)}, "data": {"train": str(train)}}
    with pytest.raises(ConfigError, match="data.pool"):
        preflight(finetune_config_from_dict(base))
    pool = tmp_path / "pool.jsonl"
    pool.write_text('{"text": "ok"}\n{"review": "no text field"}\n')
    with pytest.raises(DataError, match=r"pool.jsonl:2: key 'review' is not in the first row"):
        preflight(finetune_config_from_dict({**base, "data": {"train": str(train), "pool": str(pool)}}))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a fine film", "label": "great"}\n')
    with pytest.raises(DataError, match="great"):
        preflight(finetune_config_from_dict({**base, "mode": "none", "data": {"train": str(bad)}}))
    with pytest.raises(ConfigError, match="model.path"):
        preflight(finetune_config_from_dict({**base, "model": {"preset": "gpt-neox-20b"}}))
    assert not (tmp_path / "run").exists()  # nothing started


def test_method_none_uses_the_model_as_is_for_annotate_and_generate(tmp_path, tiny_teacher_dir, ray_local):
    """training.method=none: no fine-tune (no plan, no Ray), model.path is the teacher; the prompted
    baseline runs the same annotate / generate steps and is refused clearly when it would do nothing."""
    import json

    from s3ray.finetune.recipe import preflight, run_recipe

    rows = [{"text": f"a {w} film about {n}", "label": lab} for w, lab in (("fine", "positive"), ("dull", "negative"))
            for n in ("cats", "ships", "rain")]
    train, pool = tmp_path / "train.jsonl", tmp_path / "pool.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = {"task": {"labels": ["negative", "positive"]}, "model": {"path": str(tiny_teacher_dir)},
            "training": {"method": "none"}, "data": {"train": str(train), "pool": str(pool)},
            "annotate": {"threshold": 0.0}, "generate": {"per_label": 3, "max_tokens": 8},
            "serve": {"engine": "transformers", "dtype": "float32"}}
    with pytest.raises(ConfigError, match="method=none with mode=none does nothing"):
        finetune_config_from_dict({**base, "mode": "none"})
    with pytest.raises(ConfigError, match="model.path .*no config.json"):
        preflight(finetune_config_from_dict({**base, "model": {"path": str(tmp_path / "export")}}))
    ann = run_recipe(finetune_config_from_dict({**base, "run": {"output_dir": str(tmp_path / "a")}}))
    assert ann["steps"]["finetune"]["export_dir"] == str(Path(tiny_teacher_dir).resolve())
    assert "skipped" in ann["steps"]["finetune"] and not (tmp_path / "a" / "ray_train").exists()
    rep = ann["steps"]["annotate"]
    assert rep["n"] == rep["n_gold"] == rep["kept"] == 6 and 0 <= rep["agreement"] <= 1
    gen = run_recipe(finetune_config_from_dict({**base, "mode": "generate", "run": {"output_dir": str(tmp_path / "g")}}))
    g = gen["steps"]["generate"]
    assert g["requested"] == 6 and g["kept"] + sum(g["dropped"].values()) == 6
    assert g["teacher"]["sent"] == 6 and g["teacher"]["output_tokens"] > 0  # served by the teacher pool
    # A base model without a chat template is refused for generation before anything starts.
    plain = tmp_path / "plain"
    shutil.copytree(tiny_teacher_dir, plain)
    for f in plain.glob("chat_template.jinja"):
        f.unlink()
    conf = json.loads((plain / "tokenizer_config.json").read_text())
    conf.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(conf))
    with pytest.raises(ConfigError, match="no chat template"):
        preflight(finetune_config_from_dict({**base, "mode": "generate", "model": {"path": str(plain)}}))
