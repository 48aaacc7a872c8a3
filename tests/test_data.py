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


def test_integers_match_numeric_label_names_as_names(tmp_path):
    """Labels ["1", "0"]: the value 1 means the label "1", never labels[1] (which is "0")."""
    task = ClassificationTask(labels=["1", "0"], description="movie review")
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"text": "fine film indeed", "label": i % 2}) for i in range(4)))
    assert [r["label"] for r in load_rows(p, task, "validation")] == ["0", "1", "0", "1"]
    csv = tmp_path / "d.csv"  # Arrow reads this column as integers
    csv.write_text("text,label\nfine film indeed,1\nbad film indeed,0\n")
    assert [r["label"] for r in load_rows(csv, task, "validation")] == ["1", "0"]
    # Non-numeric names: integers are indices, and one past the end is an error naming the row.
    p.write_text(json.dumps({"text": "fine film indeed", "label": 1}) + "\n" + json.dumps({"text": "so so", "label": 2}))
    with pytest.raises(DataError, match=r"row 1 .*label 2 is not one of"):
        load_rows(p, TASK, "validation")


def test_jsonl_rows_must_share_keys_and_types(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a b c", "label": "positive"}\n\n{"text": "d e f", "label": "negative", "extra": 1}\n')
    with pytest.raises(DataError, match=r"d.jsonl:3: key 'extra' is not in the first row"):
        load_rows(p, TASK, "validation")
    p.write_text('{"text": "a b c", "label": "positive"}\n{"text": ["d"], "label": "negative"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: column 'text' holds a list here but a string on line 1"):
        load_rows(p, TASK, "validation")
    # Missing keys and nulls are fine (the row check then names what is missing); ints and floats mix.
    p.write_text('{"text": "a b c", "label": "positive", "score": 1}\n{"text": "d e f", "label": null, '
                 '"score": 0.5}\n')
    with pytest.raises(DataError, match=r"row 1 \(id validation-1\)"):
        load_rows(p, TASK, "validation")


def test_validation_size_larger_than_the_data_is_an_error(tmp_path):
    with pytest.raises(DataError, match="data.validation_size is 21 but data.validation .* holds 20 rows"):
        load_rows(_write(tmp_path, "jsonl"), TASK, "validation", size=21)
    assert len(load_rows(_write(tmp_path, "jsonl"), TASK, "validation", size=20)) == 20


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
