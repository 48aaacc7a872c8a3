"""Reading real data (validation, test, contexts) and checking it against the task before any generation.

Accepted: JSON Lines (.jsonl, .jsonl.gz, .json), CSV, Parquet files, and Hugging Face `datasets` folders
(`save_to_disk`). Labels may be names or integer ids (mapped through the task's label list).
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

import pyarrow as pa

from s3ray.tasks.base import missing_text_field


class DataError(ValueError):
    """Data that does not fit the task, phrased with the field, the row and the fix."""


def read_table(path: str | Path) -> pa.Table:
    """Any supported file or folder as one Arrow table (no conversion of values)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or (p / "state.json").exists():
            import datasets

            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                raise DataError(f"{p} is a DatasetDict with splits {list(ds)}: point at one split's folder")
            return ds.data.table if hasattr(ds.data, "table") else ds.with_format("arrow")[:]
        parquet = sorted(p.glob("*.parquet"))
        if parquet:
            import pyarrow.parquet as pq

            return pq.read_table(str(p))
        raise DataError(f"{p}: a folder must be a HF datasets folder (save_to_disk) or hold .parquet files")
    name = p.name.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(str(p))
    if name.endswith((".csv", ".csv.gz", ".tsv")):
        import pyarrow.csv as pcsv

        parse = pcsv.ParseOptions(delimiter="\t" if name.endswith(".tsv") else ",")
        return pcsv.read_csv(pa.input_stream(str(p), compression="detect"), parse_options=parse)
    if name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        # Python's json per line: clearer errors (line numbers) than Arrow's reader on a bad line.
        import gzip

        opener = gzip.open if name.endswith(".gz") else open
        rows = []
        with opener(p, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{p}:{i}: not valid JSON ({e.msg}); expected one JSON object per line")
        return pa.Table.from_pylist(rows)
    raise DataError(f"{p}: unsupported file type; use .jsonl[.gz], .csv, .tsv, .parquet or a HF datasets folder")


def card_labels(path: str | Path) -> list[str] | None:
    """Label names from a dataset card (card.json) beside the data file, if there is one."""
    p = Path(path).expanduser()
    card = (p if p.is_dir() else p.parent) / "card.json"
    if card.is_file():
        labels = json.loads(card.read_text()).get("labels")
        return list(labels) if labels else None
    return None


def _normalize_label(value, labels: list[str]):
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and 0 <= value < len(labels):
        return labels[value]
    return value


def load_rows(
    path: str | Path,
    task,
    split: str,
    field_map: dict[str, str] | None = None,
    size: int | None = None,
    seed: int = 0,
) -> list[dict]:
    """Rows of one split, renamed, label-normalised and validated against `task`; optionally subsampled
    (stratified by label so a small validation set keeps every label)."""
    table = read_table(path)
    field_map = field_map or {}
    rows = table.to_pylist()
    if not rows:
        raise DataError(f"data.{split} ({path}) is empty")
    # A contexts file only has to hold what seed prompts keep (premises, paragraphs): no labels, no answers.
    only_context = split == "contexts"
    if only_context:
        needed = list(task.context_fields)
    else:
        needed = list(task.fields) + (["label"] if task.labels is not None else [])
    renamed = [{field_map.get(k, k): v for k, v in r.items()} for r in rows]
    missing = [f for f in needed if f not in renamed[0]]
    if missing:
        raise DataError(
            f"data.{split} ({path}): columns {missing} are missing; found {sorted(rows[0])}. "
            f"Rename columns with task.field_map, e.g. field_map: {{{min(rows[0])}: {missing[0]}}}"
        )
    problems = []
    out = []
    for i, r in enumerate(renamed):
        if task.labels is not None and not only_context:
            r["label"] = _normalize_label(r.get("label"), task.labels)
        r["id"] = str(r.get("id", f"{split}-{i}"))
        err = missing_text_field(r, needed) if only_context else task.validate_row(r)
        if err:
            problems.append(f"row {i} (id {r['id']}): {err}")
        out.append(r)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DataError(
            f"data.{split} ({path}): {len(problems)} rows do not fit task {task.type!r}: "
            + "; ".join(problems[:5]) + more
            + (f". Allowed labels: {task.labels} (set task.labels or fix the data)" if task.labels else "")
        )
    ids = [r["id"] for r in out]
    if len(set(ids)) != len(ids):
        raise DataError(f"data.{split} ({path}): ids are not unique; remove the id column or make ids unique")
    if size is not None and size < len(out):
        by = "label" if task.labels is not None and not only_context else None
        out = stratified_sample(out, size, seed, by=by)
    return out


def stratified_sample(rows: list[dict], size: int, seed: int, by: str | None = "label") -> list[dict]:
    """`size` rows keeping each group's share (at least one per group), in the original order."""
    rng = random.Random(seed)
    if by is None:
        idx = sorted(rng.sample(range(len(rows)), size))
        return [rows[i] for i in idx]
    groups: dict = defaultdict(list)
    for i, r in enumerate(rows):
        groups[r[by]].append(i)
    # Largest-remainder quotas: exactly `size` rows, each group at least one.
    keys = sorted(groups, key=str)
    exact = {k: size * len(groups[k]) / len(rows) for k in keys}
    quota = {k: min(len(groups[k]), max(1, int(exact[k]))) for k in keys}
    by_remainder = sorted(keys, key=lambda k: exact[k] - int(exact[k]), reverse=True)
    while sum(quota.values()) < size:
        grew = False
        for k in by_remainder:
            if sum(quota.values()) < size and quota[k] < len(groups[k]):
                quota[k] += 1
                grew = True
        if not grew:
            break
    while sum(quota.values()) > size:
        biggest = max(keys, key=lambda k: quota[k])
        quota[biggest] -= 1
    picked = sorted(i for k in keys for i in rng.sample(groups[k], quota[k]))
    return [rows[i] for i in picked]


def split_holdout(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, holdout) with the holdout stratified by label; neither is ever the test set."""
    n_hold = max(1, round(len(rows) * fraction))
    hold = stratified_sample(rows, n_hold, seed, by="label" if "label" in rows[0] else None)
    hold_ids = {r["id"] for r in hold}
    return [r for r in rows if r["id"] not in hold_ids], hold
