"""The streaming synthesis path that `s3ray generate` and the S3 loop's seed and EES steps share.

    planned requests (a lazy iterator) -> shards of `shard_size` requests -> teacher.generate_iter (blocks,
    each finished chunk cached) -> parse, validate, dedup -> one Parquet part per shard (temp name, rename)

The driver holds one shard's requests, results and rows at a time (plus the dedup index). Shard sizes and
blocks are multiples of the backend's chunk, so the engine sees the same chunks as one `generate` over the
whole list: the rows are the same however the step is cut into shards.

A step's parts (`StepParts`) make its resume exact: a part appears only when complete and carries its range
and stats in its Parquet metadata; a resumed step keeps the finished parts, rebuilds the dedup index from
their rows (what `check_and_add` had added), skips their requests and generates the rest, where the cache
answers every chunk that had finished.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from s3ray.storage import write_parquet
from s3ray.synthesis.collect import SynthesisStats, collect_examples, rows_to_table, synthetic_schema
from s3ray.synthesis.dedup import Deduplicator
from s3ray.synthesis.plan import Planned

PART_KEY = b"s3ray.part"  # Parquet schema metadata of a part: its request range and stats


def block_size(teacher, max_in_flight: float, replicas: int) -> int:
    """Requests per generate_iter block: a multiple of the backend's chunk (exact resume), enough to keep
    every replica's in-flight window full."""
    cs = teacher.chunk_size()
    want = max(256, math.ceil(4 * max_in_flight * replicas))
    return cs * max(1, math.ceil(want / cs))


def aligned_shard_size(teacher, shard_size: int) -> int:
    """`shard_size` rounded up to whole backend chunks, so shard edges never split a chunk."""
    cs = teacher.chunk_size()
    return cs * max(1, math.ceil(shard_size / cs))


def batched(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(islice(it, n)):
        yield chunk


def synthesize_shard(planned: list[Planned], teacher, task, dedup: Deduplicator, block: int, desc: str
                     ) -> tuple[list[dict], SynthesisStats, int]:
    """One shard's rows (request order), its stats, and the tokens of its cached answers."""
    results = list(teacher.generate_iter((p.request for p in planned), block, desc=desc))
    rows, stats = collect_examples(planned, results, task, dedup, teacher.model_name)
    cached_tokens = sum(r.prompt_tokens + r.output_tokens for r in results if r.cached)
    return rows, stats, cached_tokens


def stats_from_dict(d: dict) -> SynthesisStats:
    return SynthesisStats(requested=d["requested"], kept=d["kept"], failed_calls=d["failed_calls"],
                          dropped=Counter(d["dropped"]), prompt_tokens=d["prompt_tokens"],
                          output_tokens=d["output_tokens"], cached=d["cached"])


class StepParts:
    """The parts folder of one synthesis step: `part-00000.parquet`, ... for requests [i*size, (i+1)*size)."""

    def __init__(self, folder: str | Path, shard_size: int) -> None:
        self.folder, self.size = Path(folder), shard_size
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, i: int) -> Path:
        return self.folder / f"part-{i:05d}.parquet"

    def finished(self) -> list[dict]:
        """The records of the leading parts written with this shard size; any other part is removed (a
        resume with another chunk size cuts the requests differently: those rows come from the cache)."""
        records, i = [], 0
        while self.path(i).is_file():
            meta = pq.read_schema(self.path(i)).metadata or {}
            rec = json.loads(meta.get(PART_KEY, b"{}"))
            if rec.get("start") != i * self.size or rec.get("end") != (i + 1) * self.size:
                break
            records.append(rec)
            i += 1
        for stale in sorted(self.folder.glob("part-*.parquet"))[i:]:
            stale.unlink()
        return records

    def write(self, i: int, table: pa.Table, stats: SynthesisStats) -> None:
        rec = {"start": i * self.size, "end": (i + 1) * self.size, "stats": stats.to_dict()}
        meta = {**(table.schema.metadata or {}), PART_KEY: json.dumps(rec).encode()}
        write_parquet(str(self.path(i)), table.replace_schema_metadata(meta))

    def files(self, n_parts: int) -> list[Path]:
        return [self.path(i) for i in range(n_parts)]

    def merge_into(self, dest: str | Path, task, n_parts: int) -> None:
        """All parts as one Parquet file, then the parts go."""
        merge_parquet(self.files(n_parts), dest, task)
        shutil.rmtree(self.folder, ignore_errors=True)


def parquet_rows(path: str | Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def iter_parquet_rows(paths: Iterable[str | Path], batch_rows: int = 4096) -> Iterator[dict]:
    """The rows of Parquet files, a batch at a time."""
    for p in paths:
        for batch in pq.ParquetFile(p).iter_batches(batch_size=batch_rows):
            yield from batch.to_pylist()


def merge_parquet(files: list[Path], dest: str | Path, task) -> None:
    """Synthetic-row files as one Parquet file at `dest`, row group by row group (never all rows in memory),
    written under a temp name, fsynced and renamed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.merge-tmp")
    schema = synthetic_schema(task)
    with pq.ParquetWriter(tmp, schema) as writer:
        for path in files:
            f = pq.ParquetFile(path)
            for g in range(f.num_row_groups):
                writer.write_table(f.read_row_group(g).replace_schema_metadata(None).cast(schema))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())  # the data reaches the disk before the name does
    os.replace(tmp, dest)
    fd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stream_step(planned: Iterable[Planned], teacher, task, dedup: Deduplicator, parts: StepParts, block: int,
                check: Callable[[SynthesisStats, str], None], desc: str) -> tuple[SynthesisStats, int]:
    """Generate a step's rows into `parts` (resuming after its finished parts); returns the step's stats and
    its number of parts. `check(stats, desc)` vets each shard before it is written (too many failed calls
    must fail the step while those calls can still be asked again)."""
    total = SynthesisStats()
    done = parts.finished()
    for rec in done:
        total.add(stats_from_dict(rec["stats"]))
    for row in iter_parquet_rows(parts.files(len(done))):  # the index as the finished parts' check_and_add left it
        dedup.add(task.dedup_text(row))
    n = len(done)
    for shard in batched(islice(planned, n * parts.size, None), parts.size):
        first = n * parts.size
        rows, stats, _ = synthesize_shard(shard, teacher, task, dedup, block, desc)
        check(stats, f"{desc} (requests {first}..{first + len(shard) - 1})")
        parts.write(n, rows_to_table(rows, task), stats)
        total.add(stats)
        n += 1
    return total, n
