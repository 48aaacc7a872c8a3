"""Student checkpoint format, QA span features and StudentPredictor, on the tiny BERT (no Ray, seconds)."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures_student import save_student_checkpoint

from s3ray.config import StudentConfig
from s3ray.student import META_FILE, StudentPredictor, read_meta, train_student
from s3ray.student.features import qa_train_features
from s3ray.tasks.classification import ClassificationTask
from s3ray.tasks.qa import ExtractiveQATask, exact_match, token_f1

LABELS = ["negative", "positive"]


def _columns(rows: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.asarray([r[k] for r in rows], dtype=object) for k in rows[0]}


QA = ExtractiveQATask(labels=None)


def _untrained_checkpoint(src, dest, task, max_length=64):
    """A checkpoint folder exactly as training writes it, without training (fresh head)."""
    return save_student_checkpoint(src, dest, task, max_length)


def test_classification_predictor_columns(tiny_student_dir, sst2_rows, tmp_path):
    ckpt = _untrained_checkpoint(tiny_student_dir, tmp_path / "ckpt", ClassificationTask(labels=LABELS))
    assert read_meta(ckpt)["labels"] == LABELS
    pred = StudentPredictor(ckpt, batch_size=16)
    batch = _columns(sst2_rows[:40])
    out = pred(batch)
    assert set(batch) <= set(out) and list(out["id"]) == list(batch["id"])
    assert set(out["prediction"]) <= set(LABELS)
    assert out["margin"].dtype == np.float32 and np.all((out["margin"] >= 0) & (out["margin"] <= 1))
    assert list(out["correct"]) == [p == g for p, g in zip(out["prediction"], batch["label"])]
    # Length-sorted batching must not scramble rows: one row at a time gives the same predictions.
    single = [pred(_columns([r]))["prediction"][0] for r in sst2_rows[:40]]
    assert single == list(out["prediction"])
    # Without the gold column there is nothing to be correct against.
    unlabelled = {k: v for k, v in batch.items() if k != "label"}
    assert "correct" not in pred(unlabelled)


def test_qa_train_features_point_at_the_answer(tiny_student_dir, adqa_rows):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_student_dir))
    rows = QA.check_student_rows(adqa_rows[:20], "test rows")
    feats = qa_train_features(tok, rows, max_length=64)
    assert len(feats) > len(rows)  # long contexts are split into several windows
    found = 0
    for f in feats:
        s, e = f["start_positions"], f["end_positions"]
        assert 0 <= s <= e < len(f["input_ids"])
        if s > 0:
            found += 1
            span = tok.decode(f["input_ids"][s : e + 1])
            assert span.replace(" ", "") != ""
    assert found >= len(rows) // 2
    # With windows long enough for whole contexts, each row has one feature whose span decodes to its answer.
    whole = qa_train_features(tok, rows, max_length=384)
    assert len(whole) == len(rows)
    hits = [
        exact_match(tok.decode(f["input_ids"][f["start_positions"] : f["end_positions"] + 1]), r["answer"])
        for f, r in zip(whole, rows)
    ]
    assert sum(hits) >= 0.9 * len(rows), hits


def test_qa_predictor_returns_spans_of_the_context(tiny_student_dir, adqa_rows, tmp_path):
    ckpt = _untrained_checkpoint(tiny_student_dir, tmp_path / "qa", QA, max_length=96)
    pred = StudentPredictor(ckpt, batch_size=8)
    rows = adqa_rows[:12]
    first = pred(_columns(rows))["prediction"]
    # Half the rows get the student's own span as their gold answer, so the data holds right and wrong
    # answers and `correct` / `f1` are checked both ways.
    rows = [dict(r, answer=p, answer_start=r["context"].index(p)) if i % 2 else r
            for i, (r, p) in enumerate(zip(rows, first))]
    batch = _columns(rows)
    out = pred(batch)
    assert list(out["prediction"]) == list(first)
    for p, ctx, gold, f1, ok in zip(
        out["prediction"], batch["context"], batch["answer"], out["f1"], out["correct"]
    ):
        assert p.strip() and p in ctx  # a non-empty span of its own context
        assert f1 == pytest.approx(token_f1(p, gold))
        assert bool(ok) == bool(exact_match(p, gold))
    assert 0 < sum(out["correct"]) < len(rows), list(out["correct"])
    assert np.all((out["margin"] >= 0) & (out["margin"] <= 1))


def test_bad_inputs_fail_clearly(tiny_student_dir, sst2_rows, adqa_rows, tmp_path):
    task = ClassificationTask(labels=LABELS)
    cfg = StudentConfig()
    bad = [dict(sst2_rows[0], label="neutral")] + sst2_rows[1:5]
    with pytest.raises(ValueError, match="neutral"):
        train_student(bad, sst2_rows[5:10], task, cfg, str(tiny_student_dir), tmp_path, seed=0)
    with pytest.raises(ValueError, match="validation rows: no rows"):
        train_student(sst2_rows[:5], [], task, cfg, str(tiny_student_dir), tmp_path, seed=0)
    with pytest.raises(ValueError, match="embedding_head"):
        train_student(
            adqa_rows[:5],
            adqa_rows[5:8],
            QA,
            StudentConfig(kind="embedding_head"),
            str(tiny_student_dir),
            tmp_path,
            seed=0,
        )
    with pytest.raises(ValueError, match="fp16"):
        train_student(
            sst2_rows[:5],
            sst2_rows[5:8],
            task,
            StudentConfig(mixed_precision="fp16"),
            str(tiny_student_dir),
            tmp_path,
            seed=0,
        )
    with pytest.raises(FileNotFoundError, match=META_FILE):
        StudentPredictor(str(tiny_student_dir))


def test_qa_rows_with_wrong_offsets_are_relocated_or_dropped(adqa_rows):
    r = adqa_rows[0]
    moved = dict(r, answer_start=r["answer_start"] + 3)
    missing = dict(r, answer="zzz not in the context zzz")
    out = QA.check_student_rows([r, moved, missing], "rows")
    assert len(out) == 2
    assert all(
        x["context"][x["answer_start"] : x["answer_start"] + len(x["answer"])] == x["answer"] for x in out
    )


def test_qa_question_longer_than_max_length_still_predicts(tiny_student_dir, adqa_rows, tmp_path):
    ckpt = _untrained_checkpoint(tiny_student_dir, tmp_path / "qa", QA, max_length=48)
    row = dict(adqa_rows[0], question=" ".join([adqa_rows[0]["question"]] * 12))
    out = StudentPredictor(ckpt)(_columns([row]))
    assert out["prediction"][0].strip() and out["prediction"][0] in row["context"]
