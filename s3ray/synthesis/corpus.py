"""`s3ray generate`: a corpus of `synthesis.corpus_rows` teacher-written rows, streamed to Parquet shards.

    rationales (cached, recorded) -> for each shard: plan its requests (plan_seed with start=) -> teacher
    (generate_iter: bounded blocks, each finished chunk cached) -> parse, validate, drop copies of real rows
    -> write the shard (temp name, fsync, rename) -> record it;  then a corpus-wide dedup pass (Ray Data),
    more shards while dedup left fewer rows than asked, and the corpus card.

Memory: the driver holds one shard's requests and rows at a time; the dedup index lives in Ray Data.
Exact resume: finished shards are skipped; the rest are planned again with the same ids and seeds and the
generation cache answers every chunk that had finished, so only unfinished calls reach the teacher.
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import sys
import time
from collections import Counter

import pyarrow.parquet as pq
from tqdm.auto import tqdm

from s3ray.config import S3Config
from s3ray.models import portable
from s3ray.pipeline.mirror import CacheSync, sigterm_unwinds
from s3ray.pipeline.rundir import atomic_write_bytes
from s3ray.pipeline.s3 import RunInputs, check_failed_calls, needs_staging
from s3ray.runtime import alive_nodes, init_ray, set_cache_dirs
from s3ray.synthesis.collect import collect_rationales, rows_to_table
from s3ray.synthesis.dedup import Deduplicator
from s3ray.synthesis.dedup_scale import drops_of_shard, find_duplicates
from s3ray.synthesis.plan import plan_rationales, plan_seed
from s3ray.synthesis.shards import CARD_FILE, CORPUS_DIR, STATE_DIR, CorpusState, shard_name
from s3ray.synthesis.stream import block_size, synthesize_shard
from s3ray.teacher.teacher import Teacher, make_teacher

log = logging.getLogger("s3ray.corpus")
MAX_DEDUP_PASSES = 5


class ProtectOnly(Deduplicator):
    """Checks rows against the real validation/test rows only; remembers no synthetic row (the corpus-wide
    pass does that), so the driver's index does not grow with the corpus."""

    def add(self, text: str) -> None:
        return None


def _identity(cfg: S3Config) -> dict:
    """What must not change between a corpus and its resume (it would change the rows)."""
    dump = cfg.model_dump(mode="json")
    syn = {k: v for k, v in dump["synthesis"].items() if k != "corpus_rows"}  # asking for more rows is fine
    return {"task": dump["task"], "data": dump["data"], "seed": cfg.run.seed, "synthesis": syn,
            "teacher.model": cfg.teacher.model, "teacher.engine": cfg.teacher.engine,
            "teacher.sampling": dump["teacher"]["sampling"], "teacher.dtype": cfg.teacher.dtype}


class Progress:
    """rows/s, teacher tokens/s, ETA and drops: a tqdm bar on a terminal, a log line per shard otherwise."""

    def __init__(self, target: int, have: int) -> None:
        self.target, self.t0, self.start = target, time.monotonic(), have
        self.tokens, self.dropped = 0, Counter()
        self.bar = tqdm(total=target, initial=min(have, target), unit="row", desc="corpus", dynamic_ncols=True,
                        disable=not sys.stderr.isatty())

    def shard_done(self, have: int, rec: dict) -> None:
        self.tokens += rec["prompt_tokens"] + rec["output_tokens"] - rec["cached_tokens"]
        self.dropped.update(rec["dropped"])
        secs = max(1e-9, time.monotonic() - self.t0)
        rate = (have - self.start) / secs
        eta = (self.target - have) / rate if rate > 0 else float("inf")
        stats = {"rows/s": f"{rate:.1f}", "tok/s": f"{self.tokens / secs:.0f}", "eta_s": f"{eta:.0f}"}
        self.bar.update(max(0, min(have, self.target) - self.bar.n))
        self.bar.set_postfix(stats)
        if self.bar.disable:
            log.info("corpus: %d/%d rows, %s rows/s, %s teacher tok/s, ETA %s s, dropped %s", have, self.target,
                     stats["rows/s"], stats["tok/s"], stats["eta_s"], dict(self.dropped) or "none")

    def close(self) -> None:
        self.bar.close()


def _rationales(state: CorpusState, cfg: S3Config, inputs: RunInputs, teacher: Teacher) -> dict[str, list[str]]:
    if state.data["rationales"] is not None:
        return state.data["rationales"]["rationales"]
    got: dict[str, list[str]] = {}
    if cfg.uses_rationales and inputs.task.labels:
        # Same ids and seeds as `s3ray run`'s rationale step: its cached answers are reused.
        planned = plan_rationales(inputs.task, cfg.synthesis.num_rationales, cfg.teacher.sampling, cfg.run.seed)
        got, stats = collect_rationales(planned, teacher.generate([p.request for p in planned], desc="rationales"),
                                        inputs.task, cfg.synthesis.num_rationales)
        check_failed_calls(stats, cfg.synthesis.max_failed_call_fraction, "rationales")
    state.data["rationales"] = {"rationales": got}
    state.save()
    return got


def _generate_shard(i: int, cfg: S3Config, inputs: RunInputs, rationales, teacher: Teacher, dedup: ProtectOnly,
                    block: int):
    size = cfg.synthesis.corpus_shard_size
    planned = plan_seed(inputs.task, size, rationales, cfg.synthesis.rationales_per_example, inputs.contexts,
                        cfg.teacher.sampling, cfg.run.seed, start=i * size)
    rows, stats, cached_tokens = synthesize_shard(planned, teacher, inputs.task, dedup, block, f"shard {i}")
    check_failed_calls(stats, cfg.synthesis.max_failed_call_fraction, f"corpus shard {i}")
    record = {"start": i * size, "end": (i + 1) * size, "rows": len(rows), "requested": stats.requested,
              "dropped": dict(stats.dropped), "failed_calls": stats.failed_calls, "cached": stats.cached,
              "prompt_tokens": stats.prompt_tokens, "output_tokens": stats.output_tokens,
              "cached_tokens": cached_tokens, "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    return rows_to_table(rows, inputs.task), record


def _rows_now(state: CorpusState) -> int:
    return sum(s["rows"] for s in state.shards) - sum(p["dropped"] for p in state.data["dedup"])


def _dedup_pass(state: CorpusState, cfg: S3Config, inputs: RunInputs) -> None:
    """One corpus-wide pass: find duplicates (Ray Data), then remove them shard by shard (idempotent)."""
    n = len(state.data["dedup"])
    out = state.dir / f"dedup-{n}"
    fields = [f for f in inputs.task.fields if f not in inputs.task.context_fields]
    if out.is_dir():  # a pass cut off after its drop list was complete: apply that list (same shards)
        found = sum(pq.ParquetFile(f).metadata.num_rows for f in out.glob("*.parquet"))
    else:
        # Ray Data's read tasks may run on any node: there the working copy of an object store corpus is
        # not, but its URI is (shards are pushed before the state that records them).
        files = [str(f) for f in state.shard_files()]
        if state.remote and len(alive_nodes()) > 1:
            files = [state.uri_of(f"{CORPUS_DIR}/{s['file']}") for s in state.shards]
        found = find_duplicates(files, fields, cfg.synthesis.near_duplicate_threshold, out)
        state.changed(out)

    reasons: Counter = Counter()
    for i in range(len(state.shards)):
        drops = drops_of_shard(out, i)
        if drops is None or not drops.num_rows:
            continue
        state.rewrite_without(set(drops.column("id").to_pylist()), i)
        reasons.update(drops.column("reason").to_pylist())
    state.data["dedup"].append({"pass": n, "dropped": found, "reasons": dict(reasons),
                                "shards": len(state.shards)})
    state.save()
    log.info("corpus-wide dedup pass %d over %d shards: dropped %d (%s)", n, len(state.shards), found,
             dict(reasons) or "none")


def _teacher_for_every_node(cfg: S3Config, inputs: RunInputs, state: CorpusState, backend: str | None) -> str:
    """What teacher replicas load, whichever node they land on (as `s3ray run` does): a local model folder is
    staged under the corpus storage when that is an object store or the cluster has several nodes, and a
    multi-node cluster must first prove that every node sees that storage."""
    if backend == "local" or cfg.teacher.engine == "openai":
        return inputs.teacher_path
    return portable(cfg.teacher.model, inputs.teacher_path, state.uri, needs_staging(state.uri, state.remote))


def generate_corpus(cfg: S3Config, inputs: RunInputs, resume: bool = False, backend: str | None = None) -> dict:
    """Generate (or resume) the corpus of `cfg.synthesis.corpus_rows` rows; returns its card."""
    target = cfg.synthesis.corpus_rows
    state = CorpusState(cfg.run.output_dir, _identity(cfg), resume, local_dir=cfg.run.local_dir)
    set_cache_dirs(state.root / "cache")
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    node_teacher = _teacher_for_every_node(cfg, inputs, state, backend)
    cache_path = state.root / "teacher_cache.sqlite"
    # An object store corpus carries its generation cache too (the same URI `s3ray run` on it reads).
    sync = CacheSync(cache_path, state.uri_of("teacher_cache.sqlite")) if state.remote else None
    teacher = make_teacher(cfg.teacher, inputs.teacher_path, run_seed=cfg.run.seed, cache_path=cache_path,
                           model_name=cfg.teacher.model, backend=backend, node_model_path=node_teacher)
    dedup = ProtectOnly(cfg.synthesis.near_duplicate_threshold)
    dedup.protect(inputs.task.dedup_text(r) for r in inputs.validation + (inputs.test or []))
    try:
        with sigterm_unwinds():  # `ray job stop`: the finally below still pushes the cache
            return _generate(state, cfg, inputs, teacher, dedup, target)
    finally:
        if sync is not None:
            sync.stop()
        teacher.close()
        state.close()


def _generate(state: CorpusState, cfg: S3Config, inputs: RunInputs, teacher: Teacher, dedup: ProtectOnly,
              target: int) -> dict:
    """Rationales, shards until `target` rows survive the corpus-wide dedup, then the card."""
    rationales = _rationales(state, cfg, inputs, teacher)
    _finish_incomplete_pass(state)
    block = None
    for _ in range(MAX_DEDUP_PASSES):
        progress = Progress(target, _rows_now(state))
        while _rows_now(state) < target:
            block = block or block_size(teacher, cfg.teacher.max_in_flight, cfg.teacher.replicas)
            i = len(state.shards)
            table, record = _generate_shard(i, cfg, inputs, rationales, teacher, dedup, block)
            state.write_shard(i, table, record)
            progress.shard_done(_rows_now(state), record)
        progress.close()
        unchecked = not state.data["dedup"] or state.data["dedup"][-1]["shards"] < len(state.shards)
        if unchecked:
            _dedup_pass(state, cfg, inputs)
        if _rows_now(state) >= target:
            break
    return _finish(state, cfg, inputs, teacher, target)


def _finish_incomplete_pass(state: CorpusState) -> None:
    """A drop list cut off mid-write is thrown away (the pass runs again); a complete one is applied by
    `_dedup_pass` (its rewrites are idempotent)."""
    for d in sorted(state.dir.glob("dedup-*.tmp")):
        shutil.rmtree(d, ignore_errors=True)


def _finish(state: CorpusState, cfg: S3Config, inputs: RunInputs, teacher: Teacher, target: int) -> dict:
    """Trim the rows beyond `target` (highest request indices; idempotent: counted from the files), then
    write the corpus card."""
    state.data["beyond_corpus_rows"] = max(0, _rows_now(state) - target)
    state.save()
    extra = sum(pq.ParquetFile(f).metadata.num_rows for f in state.shard_files()) - target
    for i in reversed(range(len(state.shards))):
        if extra <= 0:
            break
        ids = pq.read_table(state.corpus / state.shards[i]["file"], columns=["id"]).column("id").to_pylist()
        cut = ids[max(0, len(ids) - extra):]
        state.rewrite_without(set(cut), i)
        extra -= len(cut)
    card = corpus_card(state, cfg, inputs, teacher)
    # Beside the shard folder, not in it: `load_dataset("parquet", data_dir=corpus)` reads every file there.
    state.changed(atomic_write_bytes(state.root / CARD_FILE, json.dumps(card, indent=2).encode()))
    state.data["done"] = True
    state.save()
    return card


def corpus_card(state: CorpusState, cfg: S3Config, inputs: RunInputs, teacher: Teacher) -> dict:
    labels: Counter = Counter()
    rows = 0
    for f in state.shard_files():
        t = pq.read_table(f, columns=["label"] if "label" in pq.read_schema(f).names else [])
        rows += pq.ParquetFile(f).metadata.num_rows
        if t.num_columns:
            labels.update(t.column("label").to_pylist())
    dropped: Counter = Counter()
    for s in state.shards:
        dropped.update(s["dropped"])
    for p in state.data["dedup"]:
        dropped.update(p["reasons"])
    if state.data.get("beyond_corpus_rows"):
        dropped["beyond_corpus_rows"] = state.data["beyond_corpus_rows"]
    return {
        "rows": rows, "requested": sum(s["requested"] for s in state.shards), "shards": len(state.shards),
        "files": [s["file"] for s in state.shards], "dropped": dict(dropped),
        "failed_calls": sum(s["failed_calls"] for s in state.shards),
        "label_balance": dict(sorted(labels.items())), "task": inputs.task.type,
        "teacher": {"model": cfg.teacher.model, "engine": cfg.teacher.engine, "replicas": cfg.teacher.replicas},
        "sampling": cfg.teacher.sampling.model_dump(mode="json"), "seed": cfg.run.seed,
        "tokens": {"prompt": sum(s["prompt_tokens"] for s in state.shards),
                   "output": sum(s["output_tokens"] for s in state.shards)},
        "rationales": state.data["rationales"]["rationales"], "teacher_stats": teacher.stats().to_dict(),
        "state": f"{STATE_DIR}/state.json", "first_file": shard_name(0),
        "load": 'datasets.load_dataset("parquet", data_dir=CORPUS_DIR, data_files="part-*.parquet")',
    }
