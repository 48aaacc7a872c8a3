"""Turning teacher replies into synthetic rows: parse, validate, de-duplicate, and count every drop."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

from s3ray.synthesis.dedup import Deduplicator
from s3ray.tasks.base import ParseError


@dataclass
class SynthesisStats:
    """What happened to the requests of one synthesis step (the report's generated/kept/dropped table)."""

    requested: int = 0
    kept: int = 0
    failed_calls: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached: int = 0

    def add(self, other: SynthesisStats) -> None:
        self.requested += other.requested
        self.kept += other.kept
        self.failed_calls += other.failed_calls
        self.dropped.update(other.dropped)
        self.prompt_tokens += other.prompt_tokens
        self.output_tokens += other.output_tokens
        self.cached += other.cached

    def to_dict(self) -> dict:
        return {
            "requested": self.requested,
            "kept": self.kept,
            "failed_calls": self.failed_calls,
            "dropped": dict(self.dropped),
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "cached": self.cached,
        }


def _count_tokens(stats: SynthesisStats, results) -> None:
    for res in results:
        stats.requested += 1
        stats.prompt_tokens += res.prompt_tokens
        stats.output_tokens += res.output_tokens
        stats.cached += int(res.cached)
        if not res.ok:
            stats.failed_calls += 1


def collect_rationales(planned, results, task, k: int) -> tuple[dict[str, list[str]], SynthesisStats]:
    """Merge the rationale samples per label: unique reasons, at most k per label."""
    stats = SynthesisStats()
    _count_tokens(stats, results)
    merged: dict[str, list[str]] = {lab: [] for lab in task.labels or []}
    for plan, res in zip(planned, results):
        if not res.ok:
            continue
        try:
            items = task.parse_rationales(res.text, k)
        except ParseError as e:
            stats.dropped[e.reason] += 1
            continue
        have = merged[plan.label]
        for it in items:
            if len(have) < k and it.lower() not in {h.lower() for h in have}:
                have.append(it)
        stats.kept += 1
    return merged, stats


_SENTENCE_END = re.compile(r"[.!?][\"”')\]]?(?=\s|$)")


def trim_truncated(text: str) -> str:
    """A reply cut off by max_tokens ends mid-sentence: keep it up to its last full sentence, if any."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    return text[: ends[-1]] if ends else text


def collect_examples(planned, results, task, dedup: Deduplicator, teacher_model: str) -> tuple[list[dict], SynthesisStats]:
    """Rows from teacher replies, in request order. Failed calls and unusable replies are counted, never fatal."""
    stats = SynthesisStats()
    _count_tokens(stats, results)
    rows = []
    for plan, res in zip(planned, results):
        assert plan.request.request_id == res.request_id, "teacher results out of order"
        if not res.ok:
            continue
        text = trim_truncated(res.text) if res.finish_reason == "length" else res.text
        try:
            fields = task.parse_example(text, plan.label, plan.context)
        except ParseError as e:
            stats.dropped[e.reason] += 1
            continue
        reason = dedup.check_and_add(task.dedup_text(fields))
        if reason:
            stats.dropped[reason] += 1
            continue
        s = plan.request.sampling
        rows.append(
            {
                "id": plan.request.request_id,
                **fields,
                "round": plan.round,
                "source": plan.source,
                "rationales": list(plan.rationales),
                "parent_error_id": plan.parent_error_id,
                "teacher_model": teacher_model,
                "prompt_hash": plan.request.prompt_hash(),
                "sampling": json.dumps(s.to_dict(), sort_keys=True),
                "seed": s.seed,
            }
        )
        stats.kept += 1
    return rows, stats


def synthetic_schema(task) -> pa.Schema:
    """One schema for every round's Parquet file so the final dataset loads as one table."""
    cols = [pa.field("id", pa.string())]
    for f in task.fields:
        cols.append(pa.field(f, pa.string()))
    cols += task.row_columns()  # the family's typed columns (label tasks: label; QA: answer_start)
    cols += [
        pa.field("round", pa.int64()),
        pa.field("source", pa.string()),
        pa.field("rationales", pa.list_(pa.string())),
        pa.field("parent_error_id", pa.string()),
        pa.field("teacher_model", pa.string()),
        pa.field("prompt_hash", pa.string()),
        pa.field("sampling", pa.string()),
        pa.field("seed", pa.int64()),
    ]
    return pa.schema(cols)


def rows_to_table(rows: list[dict], task) -> pa.Table:
    schema = synthetic_schema(task)
    return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)
