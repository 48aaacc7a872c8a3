"""A content-addressed record of finished teacher calls, on disk (SQLite).

Key: `GenerationRequest.cache_key(model)` (model, messages, sampling with seed). Value: the output text, token
counts and finish reason. Only successful results are stored: a failed or cancelled call is simply absent, so
a resumed run sends it again. Every `put_many` is one committed transaction, so a crash loses at most the
batch being written, never corrupts what is already there.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from s3ray.teacher.types import GenerationRequest, GenerationResult

_SCHEMA = """
CREATE TABLE IF NOT EXISTS generations (
    key TEXT PRIMARY KEY,
    request_id TEXT NOT NULL,
    text TEXT NOT NULL,
    finish_reason TEXT,
    prompt_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    created REAL NOT NULL
)
"""


class GenerationCache:
    """`get_many` / `put_many` over an SQLite file; safe to share between threads of one process."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False)
        with self._lock, self._db:
            # WAL: readers never block the writer, and a killed process leaves a consistent file.
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(_SCHEMA)

    def get_many(self, requests: Sequence[GenerationRequest], model: str) -> dict[str, GenerationResult]:
        """Cached results by request_id, for the requests that have one (marked `cached=True`)."""
        keys: dict[str, list[str]] = {}  # one call asked under several ids gets the answer for each
        for req in requests:
            keys.setdefault(req.cache_key(model), []).append(req.request_id)
        found: dict[str, GenerationResult] = {}
        key_list = list(keys)
        with self._lock:
            for start in range(0, len(key_list), 500):  # SQLite caps the number of bound parameters
                part = key_list[start : start + 500]
                rows = self._db.execute(
                    "SELECT key, text, finish_reason, prompt_tokens, output_tokens FROM generations "
                    f"WHERE key IN ({','.join('?' * len(part))})",
                    part,
                ).fetchall()
                for key, text, finish, ptok, otok in rows:
                    for rid in keys[key]:
                        found[rid] = GenerationResult(rid, text=text, finish_reason=finish, prompt_tokens=ptok,
                                                      output_tokens=otok, cached=True)
        return found

    def put_many(self, pairs: Iterable[tuple[GenerationRequest, GenerationResult]], model: str) -> int:
        """Store the successful results (failed ones are skipped); one transaction. Returns rows written."""
        now = time.time()
        rows = [
            (req.cache_key(model), req.request_id, res.text, res.finish_reason, res.prompt_tokens,
             res.output_tokens, now)
            for req, res in pairs
            if res.ok
        ]
        if rows:
            with self._lock, self._db:
                self._db.executemany("INSERT OR REPLACE INTO generations VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        return len(rows)

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM generations").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> GenerationCache:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()
