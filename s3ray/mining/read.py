"""Reading for error mining: the validation set as a streaming Ray Dataset, and mined errors back as rows
(deduplicated by id: a retried write task must never give EES the same error twice)."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq

from s3ray import storage


def read_dataset(path: str | Path):
    """A Ray Dataset over a Parquet / JSONL (optionally .gz) / CSV file or a folder of them; an object store
    URI (a run's storage) holds Parquet."""
    import ray.data  # Ray stays out of the core's imports (only runtime.py and the teacher pool import it)

    if not storage.is_local(str(path)):
        fs, inside = storage.resolve(str(path))
        return ray.data.read_parquet(inside, filesystem=fs)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"validation set {p} does not exist (data.validation in the run config)")
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    names = [f.name.lower() for f in files if not f.name.startswith((".", "_"))]
    if not names:
        raise ValueError(f"validation set folder {p} holds no data files")
    if all(n.endswith(".parquet") for n in names):
        return _read_parquet(str(p), n_files=len(names))
    if all(n.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")) for n in names):
        return ray.data.read_json(str(p), lines=True)
    if all(n.endswith((".csv", ".csv.gz")) for n in names):
        return ray.data.read_csv(str(p))
    raise ValueError(
        f"validation set {p}: expected Parquet, JSONL (.jsonl/.jsonl.gz) or CSV files, found {sorted(set(names))[:5]}"
    )


FOOTER_ACTOR_MIN_FILES = 64  # below this many Parquet files, read footers on the driver (see _read_parquet)


def _read_parquet(path: str, n_files: int):
    """`ray.data.read_parquet`, without a footer-reader actor pool for a handful of files.

    Ray Data's DataSourceV2 Parquet reader starts a pool of FooterReader actors per read, to spread footer
    reads of thousands of remote files. For a few local files those are fresh worker processes that start
    at the same moment as the inference actors: on 2 cores they pushed the student's first batch back by 3 s
    (8.4 s -> 5.6 s from the start of mining; benchmarks/mining_throughput.py). So a small read uses the V1
    reader, which reads the footers on the driver; the rows still stream in blocks either way. A user's
    RAY_DATA_USE_DATASOURCE_V2 is respected."""
    import ray.data  # see read_dataset
    ctx = ray.data.DataContext.get_current()
    before = getattr(ctx, "use_datasource_v2", None)  # None: a Ray without the V2 reader
    if before is None or n_files >= FOOTER_ACTOR_MIN_FILES or "RAY_DATA_USE_DATASOURCE_V2" in os.environ:
        return ray.data.read_parquet(path)
    ctx.use_datasource_v2 = False  # chosen when the read is planned; restored for the caller's other reads
    try:
        return ray.data.read_parquet(path)
    finally:
        ctx.use_datasource_v2 = before


def read_errors(path: str | Path) -> list[dict]:
    """The rows under a mining `errors_path` (errors, then hard examples), one per id, in id order."""
    if storage.is_local(str(path)):
        rows = pq.read_table(str(path)).to_pylist()
    else:
        fs, inside = storage.resolve(str(path))
        rows = pq.read_table(inside, filesystem=fs).to_pylist()
    seen: set = set()
    out = []
    for r in sorted(rows, key=lambda r: (r.get("kind") != "error", str(r.get("id")))):
        key = r.get("id")
        if key is not None and key in seen:
            continue
        seen.add(key)
        out.append(r)
    return out
