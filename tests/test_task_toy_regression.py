"""A fourth task family in one file: regression on a float `score`, registered by name and run through the
real student code (Ray Train fine-tuning, the predictor, Ray Data error mining) on the tiny BERT.

Nothing outside this file knows the family: it decides its gold field, metric, student head (a one-output
regressor), how outputs become predictions and what counts as an error (|prediction - score| > 0.5)."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import ray.cloudpickle
import torch
from transformers import AutoModelForSequenceClassification

from s3ray.config import MiningConfig, StudentConfig
from s3ray.mining import mine_errors, read_errors
from s3ray.student import StudentPredictor, evaluate_student, read_meta, train_student
from s3ray.student.features import encode_texts
from s3ray.tasks import register_task, task_class
from s3ray.tasks.base import Task, missing_text_field

TOLERANCE = 0.5

# Ray's workers cannot import modules from tests/: ship this family's classes to them by value (a family in
# an installed package travels by reference, like the built-in ones).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass
class RegressionHead:
    """A one-output sequence regressor (HF's MSE loss). The prediction is the output; a regressor has no
    class probabilities to be unsure between, so every margin is 1 (no hard examples by margin)."""

    task: Task
    supports_embedding_head: bool = False

    def build(self, model_path: str, trust_remote_code: bool = False):
        return AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=1, problem_type="regression", trust_remote_code=trust_remote_code
        )

    def features(self, tokenizer, rows, max_length):
        enc = encode_texts(tokenizer, [r["text"] for r in rows], None, max_length)
        return [{**{k: enc[k][i] for k in enc}, "labels": float(r["score"])} for i, r in enumerate(rows)]

    @torch.no_grad()
    def predict(self, model, tokenizer, rows, max_length, batch_size, device, progress=False):
        out = []
        for s in range(0, len(rows), batch_size):
            texts = [str(r["text"]) for r in rows[s : s + batch_size]]
            enc = encode_texts(tokenizer, texts, None, max_length, padding=True, return_tensors="pt")
            out += model(**{k: v.to(device) for k, v in enc.items()}).logits[:, 0].float().cpu().tolist()
        return out, np.ones(len(out), dtype=np.float32)


@dataclass
class ToyScoreTask(Task):
    type: str = "toy_score"
    fields: tuple[str, ...] = ("text",)
    gold_field: str = "score"
    needs_labels: bool = False
    primary_metric: str = "within_half"
    secondary_metric: str = "mse"

    def validate_row(self, row: dict) -> str | None:
        if problem := missing_text_field(row, self.fields):
            return problem
        if not isinstance(row.get("score"), (int, float)):
            return f"score {row.get('score')!r} is not a number"
        return None

    def student_inputs(self, row: dict) -> tuple[str, str | None]:
        return row["text"], None

    def student_head(self):
        return RegressionHead(self)

    def score_rows(self, predictions, golds):
        errs = [abs(float(p) - float(g)) for p, g in zip(predictions, golds)]
        return {"correct": [e <= TOLERANCE for e in errs], "abs_error": errs}

    def metric_stats(self, predictions, golds):
        errs = self.score_rows(predictions, golds)["abs_error"]
        return {"n": len(errs), "hits": float(sum(e <= TOLERANCE for e in errs)),
                "sse": float(sum(e * e for e in errs))}

    def metrics_from_stats(self, stats):
        n = int(stats.get("n", 0))
        if n == 0:
            return {"within_half": float("nan"), "mse": float("nan"), "n": 0}
        return {"within_half": stats["hits"] / n, "mse": stats["sse"] / n, "n": n}

    @classmethod
    def row_columns(cls):
        return [pa.field("score", pa.float64())]


register_task("toy_score", ToyScoreTask)


def _scored(rows: list[dict]) -> list[dict]:
    """SST-2 rows with a score: 2.0 for positive, 0.0 for negative (so half-point accuracy means learning)."""
    return [{"id": r["id"], "text": r["text"], "score": 2.0 if r["label"] == "positive" else 0.0} for r in rows]


def test_the_family_is_registered_and_decides_its_report_columns():
    assert task_class("toy_score") is ToyScoreTask
    task = ToyScoreTask(labels=None)
    assert task.metrics([0.1, 1.9, 1.0], [0.0, 2.0, 0.0]) == pytest.approx(
        {"within_half": 2 / 3, "mse": (0.01 + 0.01 + 1.0) / 3, "n": 3})
    with pytest.raises(ValueError, match="already registered"):
        register_task("toy_score", Task)
    with pytest.raises(ValueError, match="score 'high' is not a number"):
        task.check_student_rows([{"id": "a", "text": "fine", "score": "high"}], "rows")


@pytest.mark.slow
def test_toy_family_trains_predicts_and_mines(ray_local, tiny_student_dir, sst2_rows, tmp_path):
    task = ToyScoreTask(labels=None)
    rows = _scored(sst2_rows)
    train, val = rows[:150], rows[150:200]
    cfg = StudentConfig(epochs=4, batch_size=8, learning_rate=5e-3, max_length=64)
    res = train_student(train, val, task, cfg, str(tiny_student_dir), tmp_path / "student", seed=0, desc="toy")

    # Trained through Ray Train with the family's head; the best epoch by its primary metric.
    assert [h["epoch"] for h in res.history] == [1, 2, 3, 4]
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    assert all(math.isfinite(h["train_loss"]) for h in res.history)
    best = max(h["val"]["within_half"] for h in res.history)
    assert res.val_metrics["within_half"] == best and set(res.val_metrics) == {"within_half", "mse", "n"}
    assert read_meta(res.checkpoint)["task_type"] == "toy_score"

    # The predictor finds the family by the checkpoint's name (registry) and predicts floats.
    pred = StudentPredictor(res.checkpoint, batch_size=16)
    out = pred({k: np.asarray([r[k] for r in val], dtype=object) for k in ("id", "text", "score")})
    assert out["prediction"].dtype.kind == "f" and out["abs_error"].dtype.kind == "f"
    assert list(out["correct"]) == [abs(p - r["score"]) <= TOLERANCE for p, r in zip(out["prediction"], val)]
    assert evaluate_student(res.checkpoint, val, task, cfg).metrics == pytest.approx(res.val_metrics)

    # Ray Data mining with the family's error test and metric.
    path = tmp_path / "val.parquet"
    pd.DataFrame(val).to_parquet(path, index=False)
    mined = mine_errors(res.checkpoint, str(path), task, cfg, MiningConfig(batch_size=16, concurrency=1),
                        tmp_path / "mining")
    preds = pd.read_parquet(mined.predictions_path)
    assert mined.n_rows == len(val) and mined.metrics == pytest.approx(res.val_metrics)
    far = set(preds.loc[(preds["prediction"] - preds["score"]).abs() > TOLERANCE, "id"])
    assert 0 < len(far) < len(val)  # a mix, so the error test is checked both ways
    assert {r["id"] for r in read_errors(mined.errors_path)} == far and mined.n_errors == len(far)
