"""Corpus-wide exact and MinHash-LSH dedup with Ray Data, so no index of the whole corpus sits on the driver.

Each row yields keys: one for its normalised text (exact) and one per LSH band of its word-shingle MinHash
(the same normalisation, shingles, permutations and threshold as `Deduplicator`, with datasketch's band
split for that threshold). Rows sharing a key form a cluster; Ray Data shuffles keys into hash buckets, and
each bucket (pandas, vectorised) drops every member of a cluster but the lowest request index, with reason
exact_duplicate (shared text) or near_duplicate (a shared band).
Lowest-index-wins makes passes monotone: shards generated later never change what earlier passes kept.
Copies of real validation/test rows are dropped earlier, per row, while shards are written.
"""

from __future__ import annotations

import hashlib
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from datasketch import MinHashLSH

from s3ray.synthesis.dedup import _NUM_PERM, _minhash, normalize

EXACT, NEAR = "exact_duplicate", "near_duplicate"
KEYS_PER_BUCKET = 200_000  # rows of one map_groups call: bounded worker memory, few Python calls


def band_params(threshold: float) -> tuple[int, int]:
    """(bands, rows per band) that datasketch's MinHashLSH picks for `threshold`."""
    lsh = MinHashLSH(threshold=threshold, num_perm=_NUM_PERM)
    return lsh.b, lsh.r


def request_index(row_id: str) -> int:
    """`seed/123` -> 123: the order in which requests were planned (lowest wins a cluster)."""
    return int(str(row_id).rsplit("/", 1)[1])


def bucket_of(values: pd.Series, buckets: int) -> np.ndarray:
    """A stable bucket per value (the same in every worker process)."""
    return (pd.util.hash_pandas_object(values, index=False).to_numpy() % np.uint64(buckets)).astype(np.int64)


def row_keys(batch: pd.DataFrame, text_fields: list[str], bands: int, rows: int, buckets: int) -> pd.DataFrame:
    """One output row per (input row, key), with the key's bucket."""
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
    df = pd.DataFrame(out)
    df["bucket"] = bucket_of(df["key"], buckets)
    return df


def cluster_losers(group: pd.DataFrame, buckets: int) -> pd.DataFrame:
    """Within one bucket of keys: every member of each key's cluster but the lowest request index, with
    whether the key was exact (rank 0) or a band (rank 1), and the bucket of its id."""
    group = group.drop_duplicates(["key", "idx"])
    losers = group[group["idx"] != group.groupby("key")["idx"].transform("min")]
    out = pd.DataFrame({"id": losers["id"].astype(str), "shard": losers["shard"].astype(np.int64),
                        "rank": np.where(losers["key"].str.startswith("x"), 0, 1).astype(np.int64)})
    out["bucket"] = bucket_of(out["id"], buckets)
    return out.reset_index(drop=True)


def one_reason(group: pd.DataFrame) -> pd.DataFrame:
    """Within one bucket of ids: a row dropped through several keys counts once, as exact when any of them
    was exact."""
    best = group.groupby("id", sort=True).agg(shard=("shard", "min"), rank=("rank", "min")).reset_index()
    return pd.DataFrame({"id": best["id"].astype(str), "shard": best["shard"].astype(np.int64),
                         "reason": np.where(best["rank"] == 0, EXACT, NEAR)})


def find_duplicates(shard_files: list[str], text_fields: list[str], threshold: float, out_dir: Path) -> int:
    """Write (id, shard, reason) of every row to drop to Parquet under the local folder `out_dir` (replaced
    atomically); returns how many. `shard_files`: paths every Ray node can read (local paths on one node or
    a shared filesystem, else object store URIs)."""
    import pyarrow.parquet as pq
    import ray.data  # Ray Data only where the corpus-wide pass runs

    from s3ray import storage

    bands, rows = band_params(threshold)
    fs, _ = storage.resolve(str(shard_files[0]))
    paths = [storage.resolve(str(f))[1] for f in shard_files]
    # Keys are grouped by bucket, not one by one: a Python call per key (millions) would dominate the pass.
    n_keys = sum(pq.ParquetFile(p, filesystem=fs).metadata.num_rows for p in paths) * (bands + 1)
    buckets = max(4, math.ceil(n_keys / KEYS_PER_BUCKET))
    ds = ray.data.read_parquet(paths, filesystem=fs, include_paths=True).select_columns(["id", "path", *text_fields])
    keys = ds.map_batches(row_keys, batch_format="pandas", fn_kwargs={"text_fields": text_fields, "bands": bands,
                                                                      "rows": rows, "buckets": buckets})
    parts = max(2, min(200, len(paths), buckets))  # Ray's default of 200 hash partitions swamps a small corpus
    losers = keys.groupby("bucket", num_partitions=parts).map_groups(
        cluster_losers, batch_format="pandas", fn_kwargs={"buckets": buckets})
    drops = losers.groupby("bucket", num_partitions=parts).map_groups(one_reason, batch_format="pandas")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # Written here, by the driver, batch by batch: Ray Data's own writer would put files on whichever node
    # runs its tasks, and the list is small (an id and a reason per dropped row).
    n, writer = 0, None
    try:
        for batch in drops.iter_batches(batch_format="pyarrow", batch_size=65536):
            if batch.num_rows:
                writer = writer or pq.ParquetWriter(tmp / "drops.parquet", batch.schema)
                writer.write_table(batch.cast(writer.schema))
                n += batch.num_rows
    finally:
        if writer is not None:
            writer.close()
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return n


def drops_of_shard(out_dir: Path, shard: int):
    """The (id, reason) table of one shard's drops (read with a filter: never the whole list at once)."""
    import pyarrow.dataset as pads

    files = sorted(str(f) for f in out_dir.glob("*.parquet"))
    if not files:
        return None
    return pads.dataset(files).to_table(columns=["id", "reason"], filter=pads.field("shard") == shard)
