"""The teacher fine-tune end to end on a tiny GPT-NeoX (CPU, gloo, DS_ACCELERATOR=cpu): 2-worker ZeRO-3
through Ray Train lowers the loss and resumes from its checkpoint; the export loads in vLLM and answers in the
trained format; annotation labels a pool; generation writes parsed rows; LoRA merges and serves."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from finetune_tiny import build_tiny_neox, keyword_rows, vllm_greedy
from safetensors import safe_open
from transformers import AutoTokenizer

from s3ray.config import TaskConfig
from s3ray.finetune.annotate import annotate_rows, annotation_report, load_teacher
from s3ray.finetune.config import finetune_config_from_dict
from s3ray.finetune.formats import annotation_messages, prompt_ids
from s3ray.finetune.recipe import run_recipe
from s3ray.finetune.train import finetune_teacher
from s3ray.tasks import make_task

pytestmark = pytest.mark.slow
LABELS = ["negative", "positive"]
TASK = make_task(TaskConfig(type="classification"), LABELS)


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def neox_dir(session_tmp) -> Path:
    dest = Path(session_tmp) / "tiny-neox"
    if not (dest / "config.json").is_file():
        build_tiny_neox(dest)
    return dest


def _cfg(tmp: Path, model: Path, student: dict | None = None, **training) -> object:
    return finetune_config_from_dict({
        "student": student,
        "run": {"output_dir": str(tmp / "run")},
        "task": {"type": "classification", "labels": LABELS},
        "model": {"path": str(model)},
        "training": {"num_workers": 2, "micro_batch": 4, "seq_len": 128, "learning_rate": 3e-3, "epochs": 3,
                     "checkpoint_every": 4, **training},
        "data": {"train": _jsonl(tmp / "train.jsonl", keyword_rows(32)),
                 "pool": _jsonl(tmp / "pool.jsonl", keyword_rows(24, offset=300)),
                 "validation": _jsonl(tmp / "val.jsonl", keyword_rows(12, offset=900)),
                 "test": _jsonl(tmp / "test.jsonl", keyword_rows(10, offset=1200))},
        "annotate": {"threshold": 0.6},
    })


@pytest.fixture(scope="module")
def zero3(ray_local, neox_dir, tiny_student_dir, tmp_path_factory):
    """An interrupted ZeRO-3 fine-tune (stopped after 5 steps), then the recipe resuming it, annotating the
    pool and training a (fast, embedding-head) student on the kept rows."""
    tmp = tmp_path_factory.mktemp("zero3")
    student = {"model": str(tiny_student_dir), "kind": "embedding_head", "epochs": 2, "batch_size": 8,
               "max_length": 32}
    cfg = _cfg(tmp, neox_dir, student=student, zero_stage=3, format="both")
    stopped = finetune_teacher(cfg, keyword_rows(32), TASK, cfg.run.output_dir, stop_after_steps=5)
    report = run_recipe(cfg, resume=True)
    return cfg, stopped, report


def test_zero3_two_workers_lowers_the_loss_and_resumes_where_it_stopped(zero3):
    _, stopped, report = zero3
    assert stopped.export_dir is None and stopped.steps == 5 and len(stopped.history) == 5
    ft = report["steps"]["finetune"]
    meta = json.loads((Path(ft["export_dir"]) / "s3ray_teacher.json").read_text())
    hist = meta["history"]
    assert ft["steps"] == len(hist) == 24  # 64 examples (both directions) / (2 workers x 4) x 3 epochs
    assert [h["step"] for h in hist] == list(range(1, 25))
    assert [h["loss"] for h in hist[:5]] == [h["loss"] for h in stopped.history]  # the resumed run kept them
    # step 6 continues from step 5's weights: a restart from scratch would be back near the first loss
    assert hist[5]["loss"] < hist[0]["loss"] - 0.5
    first, last = sum(h["loss"] for h in hist[:3]) / 3, sum(h["loss"] for h in hist[-3:]) / 3
    assert last < first - 2.0


def test_zero3_export_is_a_16bit_hf_folder_that_vllm_serves_in_the_trained_format(zero3):
    export = Path(zero3[2]["steps"]["finetune"]["export_dir"])
    with safe_open(str(export / "model.safetensors"), "pt") as f:
        names = f.keys()
        assert {str(f.get_tensor(k).dtype) for k in names} == {"torch.bfloat16"}
    tok = AutoTokenizer.from_pretrained(export)
    pool = keyword_rows(6, offset=500)
    outs = [o.strip() for o in vllm_greedy(export, [prompt_ids(tok, annotation_messages(TASK, r)) for r in pool])]
    assert set(outs) <= set(LABELS)  # a label word, then the end-of-turn marker stopped generation
    # vLLM's greedy answer is the label our log-prob scorer ranks first (same prompt ids, same weights)
    model, tok = load_teacher(export)
    assert outs == [a.label for a in annotate_rows(model, tok, TASK, pool)]


def test_annotation_labels_the_pool_with_agreement_and_coverage(zero3):
    rep = zero3[2]["steps"]["annotate"]
    assert rep["n"] == rep["n_gold"] == 24
    model, tok = load_teacher(zero3[2]["steps"]["finetune"]["export_dir"])
    pool = keyword_rows(24, offset=300)
    anns = annotate_rows(model, tok, TASK, pool)
    assert all(0.5 <= a.confidence <= 1 and set(a.logprobs) == set(LABELS) for a in anns)
    golds = [r["label"] for r in pool]
    assert rep["agreement"] == sum(a.label == g for a, g in zip(anns, golds)) / 24
    for thr in (0.0, 0.99, 1.0):
        r = annotation_report(TASK, pool, anns, thr)
        assert r["kept"] == sum(a.confidence >= thr for a in anns) and r["coverage"] == r["kept"] / 24
    assert annotation_report(TASK, pool, anns, 0.0)["coverage"] == 1.0
    kept = pq.read_table(rep["rows"]).to_pylist()
    assert len(kept) == rep["kept"] and all(k["confidence"] >= 0.6 and k["label"] in LABELS for k in kept)


def test_an_interrupted_annotation_scores_only_the_chunks_not_saved(zero3, tmp_path, monkeypatch):
    """Two Scorer actors label the pool chunk by chunk; a rerun after a death scores only the missing part."""
    monkeypatch.setattr("s3ray.finetune.recipe.ANNOTATE_CHUNK", 10)  # 24 pool rows: parts of 10, 10 and 4
    cfg = zero3[0].model_copy(deep=True)
    cfg.training.method, cfg.student = "none", None
    cfg.model.path = zero3[2]["steps"]["finetune"]["export_dir"]
    cfg.run.output_dir, cfg.serve.replicas = str(tmp_path / "ann"), 2
    first = run_recipe(cfg)["steps"]["annotate"]
    parts = sorted((tmp_path / "ann" / "annotate_parts").glob("rows-*.json"))
    assert [len(json.loads(p.read_text())) for p in parts] == [10, 10, 4]
    manifest = tmp_path / "ann" / "manifest.json"
    m = json.loads(manifest.read_text())
    del m["steps"]["annotate"]  # died while scoring the last chunk
    manifest.write_text(json.dumps(m))
    parts[-1].unlink()
    kept_parts = {p: p.stat().st_mtime_ns for p in parts[:-1]}
    again = run_recipe(cfg, resume=True)["steps"]["annotate"]
    assert first["chunks"] == {"scored": 3, "reused": 0} and again["chunks"] == {"scored": 1, "reused": 2}
    assert all(p.stat().st_mtime_ns == t for p, t in kept_parts.items())
    same = lambda rep: {k: v for k, v in rep.items() if k not in ("rows", "chunks")}
    assert same(again) == same(first)
    assert pq.read_table(again["rows"]).to_pylist() == pq.read_table(first["rows"]).to_pylist()


def test_the_annotated_rows_train_the_student(zero3):
    rep = zero3[2]["steps"]
    assert rep["student"]["n_train"] == rep["annotate"]["kept"]
    assert rep["student"]["val_metrics"]["n"] == 12 and Path(rep["student"]["checkpoint"]).is_dir()
    assert rep["student"]["test_metrics"]["n"] == 10 and 0 <= rep["student"]["test_metrics"]["macro_f1"] <= 1


def test_gold_only_student_uses_the_labelled_rows_and_no_teacher(zero3, tmp_path):
    """training.method=none + mode=none + student: the gold-only baseline of the experiment (no fine-tune,
    no annotation; the student trains on data.train and is evaluated on data.test)."""
    cfg = zero3[0].model_copy(deep=True)
    cfg.training.method, cfg.mode, cfg.run.output_dir = "none", "none", str(tmp_path / "gold")
    rep = run_recipe(cfg)["steps"]
    assert set(rep) == {"finetune", "student"} and "skipped" in rep["finetune"]
    assert rep["student"]["n_train"] == 32 and rep["student"]["test_metrics"]["n"] == 10


def test_generation_by_the_teacher_pool_on_the_export_resumes_from_its_cache(zero3, tmp_path):
    """mode=generate serves the export with the teacher pool (vLLM CPU replica on Ray): parsed rows in the
    trained format, every reply kept or counted; the same step run again answers every request from the run's
    generation cache and sends nothing."""
    cfg = zero3[0].model_copy(deep=True)
    cfg.training.method, cfg.mode, cfg.student = "none", "generate", None
    cfg.model.path = zero3[2]["steps"]["finetune"]["export_dir"]
    cfg.run.output_dir = str(tmp_path / "gen")
    cfg.generate.per_label, cfg.generate.max_tokens, cfg.generate.temperature = 4, 16, 0.7
    cfg.serve.vllm.max_model_len = 512  # the tiny NeoX's context
    g = run_recipe(cfg)["steps"]["generate"]
    assert g["requested"] == 8 and g["kept"] + sum(g["dropped"].values()) == 8 and g["teacher"]["sent"] == 8
    rows = pq.read_table(g["rows"]).to_pylist()
    assert len(rows) == g["kept"] and all(r["label"] in LABELS and r["text"] for r in rows)
    manifest = Path(cfg.run.output_dir) / "manifest.json"
    m = json.loads(manifest.read_text())
    del m["steps"]["generate"]  # as if the run died before recording the step
    manifest.write_text(json.dumps(m))
    again = run_recipe(cfg, resume=True)["steps"]["generate"]
    assert again["teacher"]["cached"] == 8 and again["teacher"]["sent"] == 0
    assert pq.read_table(again["rows"]).to_pylist() == rows


def test_recipe_resume_skips_finished_steps(zero3):
    cfg, _, report = zero3
    manifest = json.loads((Path(cfg.run.output_dir) / "manifest.json").read_text())
    again = run_recipe(cfg, resume=True)  # nothing left to do: no training, same results
    assert again["steps"] == report["steps"]
    assert json.loads((Path(cfg.run.output_dir) / "manifest.json").read_text())["steps"] == manifest["steps"]


def test_lora_merges_for_serving_and_the_adapter_serves_on_its_base(ray_local, neox_dir, tmp_path):
    pytest.importorskip("peft", reason="LoRA needs peft (a dependency in pyproject.toml)")
    cfg = _cfg(tmp_path, neox_dir, method="lora", zero_stage=0, learning_rate=2e-2, epochs=6)
    cfg.lora.rank = 16
    cfg.lora.target_modules = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    res = finetune_teacher(cfg, keyword_rows(32), TASK, tmp_path / "out")
    export = Path(res.export_dir)
    assert (export / "model.safetensors").is_file() and (export / "adapter" / "adapter_config.json").is_file()
    with safe_open(str(export / "model.safetensors"), "pt") as f, \
            safe_open(str(neox_dir / "model.safetensors"), "pt") as base:
        names = f.keys()
        assert not any("lora" in k for k in names)
        k = "gpt_neox.layers.0.attention.query_key_value.weight"
        assert not f.get_tensor(k).equal(base.get_tensor(k))  # the adapter was folded in
    tok = AutoTokenizer.from_pretrained(export)
    pool = keyword_rows(4, offset=700)
    prompts = [prompt_ids(tok, annotation_messages(TASK, r)) for r in pool]
    merged_out = [o.strip() for o in vllm_greedy(export, prompts)]
    assert set(merged_out) <= set(LABELS)
    # the random base alone does not answer with label words; base + adapter answers as the merged model
    assert [o.strip() for o in vllm_greedy(neox_dir, prompts, lora_dir=export / "adapter", lora_rank=16)] == merged_out
