"""Reading real data (validation, test, contexts) and checking it against the task before any generation.

Accepted: JSON Lines (.jsonl, .jsonl.gz, .json), CSV, Parquet files, and Hugging Face `datasets` folders
(`save_to_disk`). Labels may be names or integer ids (mapped through the task's label list); when some label
name is itself a number (["1", "0"]), integers are matched as names instead, never as positions.
Every problem is a DataError naming the file, the line or row, and the fix.
"""

from __future__ import annotations

import gzip
import json
import random
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from s3ray.tasks.base import missing_text_field


class DataError(ValueError):
    """Data that does not fit the task, phrased with the field, the row and the fix."""


def read_table(path: str | Path) -> pa.Table:
    """Any supported file or folder as one Arrow table (no conversion of values)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    if p.is_dir():
        return _read_folder(p)
    name = p.name.lower()
    try:
        if name.endswith(".parquet"):
            return pq.read_table(str(p))
        if name.endswith((".csv", ".csv.gz", ".tsv")):
            parse = pcsv.ParseOptions(delimiter="\t" if name.endswith(".tsv") else ",")
            return pcsv.read_csv(pa.input_stream(str(p), compression="detect"), parse_options=parse)
    except (pa.ArrowInvalid, OSError) as e:
        kind = "Parquet" if name.endswith(".parquet") else "CSV"
        raise DataError(f"{p}: not a readable {kind} file ({e}); fix or re-export it") from None
    if name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        return _read_jsonl(p, gz=name.endswith(".gz"))
    raise DataError(f"{p}: unsupported file type {''.join(p.suffixes) or '(no extension)'}; "
                    "use .jsonl[.gz], .json, .csv[.gz], .tsv, .parquet or a HF datasets folder")


def _read_folder(p: Path) -> pa.Table:
    if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or (p / "state.json").exists():
        import datasets  # heavy import, only for HF folders

        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            raise DataError(f"{p} is a DatasetDict with splits {list(ds)}: point at one split's folder")
        return ds.data.table if hasattr(ds.data, "table") else ds.with_format("arrow")[:]
    if sorted(p.glob("*.parquet")):
        try:
            return pq.read_table(str(p))
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{p}: its Parquet files do not form one readable table ({e})") from None
    raise DataError(f"{p}: a folder must be a HF datasets folder (save_to_disk) or hold .parquet files")


def _read_jsonl(p: Path, gz: bool) -> pa.Table:
    """Python's json per line: errors name the line (Arrow's reader does not)."""
    rows, lines = [], []
    try:
        with (gzip.open(p, "rb") if gz else open(p, "rb")) as f:
            for i, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if i == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{p}:{i}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1});"
                                    " save the file as UTF-8") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}:{i}: not valid JSON ({e.msg}); expected one JSON object per line") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{p}:{i}: a JSON {type(obj).__name__}; expected one JSON object per line")
                rows.append(obj)
                lines.append(i)
    except (gzip.BadGzipFile, EOFError) as e:
        raise DataError(f"{p}: not a readable gzip file ({e}); re-compress it or save it as .jsonl") from None
    return _rows_to_table(rows, lines, p)


def _kind(v) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}.get(type(v), type(v).__name__)


def _rows_to_table(rows: list[dict], lines: list[int], p: Path) -> pa.Table:
    """One table from JSON rows, refusing what Arrow would drop (keys missing from the first row) or
    reject without a location (a column of mixed types)."""
    if not rows:
        return pa.table({})
    first, seen = rows[0], {}
    for r, i in zip(rows, lines):
        extra = [k for k in r if k not in first]
        if extra:
            raise DataError(f"{p}:{i}: key {extra[0]!r} is not in the first row (line {lines[0]}); every row "
                            "must have the same keys (write null for a missing value)")
        for k, v in r.items():
            kind = _kind(v)
            if kind is not None:
                was, at = seen.setdefault(k, (kind, i))
                if was != kind:
                    raise DataError(f"{p}:{i}: column {k!r} holds a {kind} here but a {was} on line {at}; "
                                    "use one type per column")
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise DataError(f"{p}: the rows do not form one table ({e}); use one type per column") from None


def card_labels(path: str | Path) -> list[str] | None:
    """Label names from a dataset card (card.json) beside the data file, if there is one."""
    p = Path(path).expanduser()
    card = (p if p.is_dir() else p.parent) / "card.json"
    if not card.is_file():
        return None
    try:
        data = json.loads(card.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{card}: not valid JSON ({e}); fix it, or set task.labels in the config") from None
    if not isinstance(data, dict):
        raise DataError(f"{card}: expected a JSON object with a 'labels' list; fix it, or set task.labels")
    labels = data.get("labels")
    if not labels:
        return None
    if not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels):
        raise DataError(f"{card}: 'labels' must be a list of label names (strings), got {labels!r}")
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise DataError(f"{card}: 'labels' names {dup} more than once; each label once")
    return list(labels)


def _is_number(name: str) -> bool:
    try:
        float(name)
    except ValueError:
        return False
    return True


def _normalize_label(value, labels: list[str], numeric_names: bool):
    """An integer is a label index only when no label name is numeric; with numeric names (["1", "0"])
    it is matched as a name, so 1 means "1", never labels[1]."""
    if isinstance(value, bool) or not isinstance(value, int):
        return value
    if numeric_names:
        return str(value)
    return labels[value] if 0 <= value < len(labels) else value


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
        raise DataError(f"data.{split} ({path}) is empty; it needs at least one row")
    # A contexts file only has to hold what seed prompts keep (premises, paragraphs): no labels, no answers.
    only_context = split == "contexts"
    if only_context:
        needed = list(task.context_fields)
    else:
        needed = list(task.fields) + (["label"] if task.labels is not None else [])
    renamed = [{field_map.get(k, k): v for k, v in r.items()} for r in rows]
    missing = [f for f in needed if f not in renamed[0]]
    if missing:
        spare = sorted(k for k in rows[0] if field_map.get(k, k) not in needed)
        example = f", e.g. field_map: {{{spare[0]}: {missing[0]}}}" if spare else ""
        raise DataError(
            f"data.{split} ({path}): columns {missing} are missing; found {sorted(rows[0])}. "
            f"Add them, or rename columns with task.field_map{example}"
        )
    problems = []
    out = []
    numeric_names = any(_is_number(lab) for lab in task.labels or [])
    for i, r in enumerate(renamed):
        if task.labels is not None and not only_context:
            r["label"] = _normalize_label(r.get("label"), task.labels, numeric_names)
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
        dup = next(i for n, i in enumerate(ids) if i in ids[:n])
        raise DataError(f"data.{split} ({path}): ids are not unique (e.g. {dup!r}); remove the id column or make "
                        "ids unique")
    if size is not None and size > len(out):
        raise DataError(f"data.{split}_size is {size} but data.{split} ({path}) holds {len(out)} rows; "
                        f"lower data.{split}_size or leave it unset to use every row")
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
