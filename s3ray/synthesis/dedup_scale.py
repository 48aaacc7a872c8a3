"""Corpus-wide exact and MinHash-LSH dedup with Ray Data, so no index of the whole corpus sits on the driver.

Each row yields keys: one for its normalised text (exact) and one per LSH band of its word-shingle MinHash
(the same normalisation, shingles, permutations and threshold as `Deduplicator`, with datasketch's band
split for that threshold). Rows sharing a key form a cluster; Ray Data groups by key and drops every member
but the lowest request index, with reason exact_duplicate (shared text) or near_duplicate (a shared band).
Lowest-index-wins makes passes monotone: shards generated later never change what earlier passes kept.
Copies of real validation/test rows are dropped earlier, per row, while shards are written.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from datasketch import MinHashLSH

from s3ray.synthesis.dedup import _NUM_PERM, _minhash, normalize

EXACT, NEAR = "exact_duplicate", "near_duplicate"


def band_params(threshold: float) -> tuple[int, int]:
    """(bands, rows per band) that datasketch's MinHashLSH picks for `threshold`."""
    lsh = MinHashLSH(threshold=threshold, num_perm=_NUM_PERM)
    return lsh.b, lsh.r


def request_index(row_id: str) -> int:
    """`seed/123` -> 123: the order in which requests were planned (lowest wins a cluster)."""
    return int(str(row_id).rsplit("/", 1)[1])


def row_keys(batch: pd.DataFrame, text_fields: list[str], bands: int, rows: int) -> pd.DataFrame:
    """One output row per (input row, key)."""
    out: dict[str, list] = {"key": [], "idx": [], "id": [], "shard": []}
    texts = batch[text_fields].astype(str).agg(" ".join, axis=1)
    for row_id, path, text in zip(batch["id"], batch["path"], texts):
        idx, shard = request_index(row_id), int(Path(path).stem.split("-")[1])
        keys = ["x" + hashlib.sha1(normalize(text).encode()).hexdigest()]
        hv = _minhash(text).hashvalues
        keys += [f"b{j}:" + hashlib.sha1(hv[j * rows : (j + 1) * rows].tobytes()).hexdigest() for j in range(bands)]
        for k in keys:
            out["key"].append(k)
            out["idx"].append(idx)
            out["id"].append(row_id)
            out["shard"].append(shard)
    return pd.DataFrame(out)


def cluster_losers(group: pd.DataFrame) -> pd.DataFrame:
    """Every member of one key's cluster but the lowest request index, with why it is dropped."""
    group = group.drop_duplicates("idx")
    if len(group) < 2:
        return pd.DataFrame({"id": [], "shard": [], "rank": []}).astype({"shard": np.int64, "rank": np.int64})
    losers = group[group["idx"] != group["idx"].min()]
    rank = 0 if str(group["key"].iloc[0]).startswith("x") else 1  # exact outranks near for the count
    return pd.DataFrame({"id": losers["id"], "shard": losers["shard"], "rank": rank})


def one_reason(group: pd.DataFrame) -> pd.DataFrame:
    """A row dropped through several keys counts once, as exact when any of them was exact."""
    best = int(group["rank"].min())
    return pd.DataFrame({"id": [group["id"].iloc[0]], "shard": [int(group["shard"].iloc[0])],
                         "reason": [EXACT if best == 0 else NEAR]})


def find_duplicates(shard_files: list[Path], text_fields: list[str], threshold: float, out_dir: Path) -> int:
    """Write (id, shard, reason) of every row to drop to Parquet files under `out_dir` (replaced atomically);
    returns how many."""
    import ray.data  # Ray Data only where the corpus-wide pass runs

    bands, rows = band_params(threshold)
    ds = ray.data.read_parquet([str(f) for f in shard_files], include_paths=True).select_columns(
        ["id", "path", *text_fields])
    keys = ds.map_batches(row_keys, batch_format="pandas", fn_kwargs={"text_fields": text_fields, "bands": bands,
                                                                      "rows": rows})
    parts = max(2, min(200, len(shard_files)))  # Ray's default of 200 hash partitions swamps a small corpus
    losers = keys.groupby("key", num_partitions=parts).map_groups(cluster_losers, batch_format="pandas")
    drops = losers.groupby("id", num_partitions=parts).map_groups(one_reason, batch_format="pandas")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)  # Ray Data writes no folder when there is nothing to drop
    drops.write_parquet(str(tmp))
    n = sum(_rows_in(f) for f in tmp.glob("*.parquet"))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return n


def _rows_in(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def drops_of_shard(out_dir: Path, shard: int):
    """The (id, reason) table of one shard's drops (read with a filter: never the whole list at once)."""
    import pyarrow.dataset as pads

    files = sorted(str(f) for f in out_dir.glob("*.parquet"))
    if not files:
        return None
    return pads.dataset(files).to_table(columns=["id", "reason"], filter=pads.field("shard") == shard)
