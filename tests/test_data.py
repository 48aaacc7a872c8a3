"""Data loading accepts JSONL/CSV/Parquet/HF folders and rejects rows that don't fit the task."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from s3ray.data.load import DataError, card_labels, load_rows, split_holdout, stratified_sample
from s3ray.tasks.classification import ClassificationTask

TASK = ClassificationTask(labels=["negative", "positive"], description="movie review")
ROWS = [{"id": f"r{i}", "text": f"review number {i} is here", "label": ["negative", "positive"][i % 2]}
        for i in range(20)]


def _write(tmp_path, fmt):
    p = tmp_path / f"d.{fmt}"
    if fmt == "jsonl":
        p.write_text("\n".join(json.dumps(r) for r in ROWS))
    elif fmt == "csv":
        p.write_text("id,text,label\n" + "\n".join(f"{r['id']},{r['text']},{r['label']}" for r in ROWS))
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(ROWS), p)
    elif fmt == "hf":
        import datasets

        p = tmp_path / "hf"
        datasets.Dataset.from_list(ROWS).save_to_disk(str(p))
    return p


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "hf"])
def test_reads_every_format(tmp_path, fmt):
    rows = load_rows(_write(tmp_path, fmt), TASK, "validation")
    assert [r["id"] for r in rows] == [r["id"] for r in ROWS]
    assert rows[3]["label"] == "positive"


def test_integer_labels_map_to_names(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"sentence": "fine film indeed", "label": i % 2}) for i in range(4)))
    rows = load_rows(p, TASK, "validation", field_map={"sentence": "text"})
    assert [r["label"] for r in rows] == ["negative", "positive", "negative", "positive"]


def test_unknown_label_names_row_and_allowed_labels(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "ok movie", "label": "neutral"}))
    with pytest.raises(DataError, match=r"row 0.*'neutral' is not one of \['negative', 'positive'\]"):
        load_rows(p, TASK, "validation")


def test_missing_column_suggests_field_map(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"sentence": "ok movie", "label": "positive"}))
    with pytest.raises(DataError, match="field_map"):
        load_rows(p, TASK, "validation")


def test_bad_json_line_is_located(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a b c", "label": "positive"}\n{oops\n')
    with pytest.raises(DataError, match=r"d.jsonl:2"):
        load_rows(p, TASK, "validation")


def test_stratified_sample_keeps_every_label_and_holdout_is_disjoint():
    rows = ROWS + [{"id": "rare", "text": "x y z w", "label": "neutral"}]
    s = stratified_sample(rows, 5, seed=1)
    assert {r["label"] for r in s} == {"negative", "positive", "neutral"}
    train, hold = split_holdout(ROWS, 0.25, seed=0)
    assert len(hold) == 5 and not {r["id"] for r in train} & {r["id"] for r in hold}
    assert len(train) + len(hold) == len(ROWS)


def test_repo_sst2_copy_matches_its_card():
    assert card_labels("data/sst2/validation.jsonl") == ["negative", "positive"]
    assert len(load_rows("data/sst2/validation.jsonl", TASK, "validation")) == 872
    assert len(load_rows("data/sst2/test.jsonl", TASK, "test")) == 1821
