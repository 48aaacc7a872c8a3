"""A run whose `run.output_dir` is an object store URI: a node-local working copy, mirrored to the URI.

The driver reads and writes the working copy (fast, and every existing check works on it) and pushes each
output to the URI before the manifest that records it, so the URI alone is a whole run: a resubmitted job
that lands on another head pulls the manifest and the outputs it records, and resumes. The teacher's SQLite
cache stays local for speed and is pushed at step boundaries, every `interval_s` while it grows, and when
the run ends or is stopped (SIGTERM, as `ray job stop` sends); a start pulls it back, merging with a local one.
"""

from __future__ import annotations

import hashlib
import logging
import re
import signal
import sqlite3
import tempfile
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path

from s3ray import storage

log = logging.getLogger("s3ray")


def working_copy(uri: str, local_dir: str | None = None) -> Path:
    """Where this node keeps its copy of the run at `uri` (`run.local_dir`, else under the s3ray cache)."""
    if local_dir:
        return Path(local_dir).expanduser().absolute()
    from s3ray.models import cache_root

    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", uri.rsplit("/", 1)[-1])[:40] or "run"
    return cache_root() / "runs" / f"{slug}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"


# --- the teacher's generation cache ---------------------------------------------------------------------
# On the URI: `<uri>` is a whole snapshot (the base) and `<uri>.parts/seg-N.sqlite` hold the rows added after
# it, one file per push, so a push costs what was generated since the last one, not the whole cache (GBs at
# corpus scale). Every MAX_SEGMENTS pushes, or first thing in a process, a new base replaces them.
MAX_SEGMENTS = 32


def _segments(uri: str) -> str:
    return f"{uri}.parts"


def _max_rowid(db: sqlite3.Connection, schema: str = "main") -> int:
    try:
        return int(db.execute(f"SELECT COALESCE(MAX(rowid), 0) FROM {schema}.generations").fetchone()[0])
    except sqlite3.OperationalError:  # no table yet: nothing was ever cached
        return 0


def _write_snapshot(local: Path, dest: Path, after_rowid: int) -> int:
    """Copy the rows of the cache at `local` with rowid > `after_rowid` (all of it for 0: SQLite's online
    backup, so a writer in this process may go on) into the new file `dest`; the highest rowid copied."""
    if after_rowid == 0:
        src, dst = sqlite3.connect(f"file:{local}?mode=ro", uri=True), sqlite3.connect(str(dest))
        try:
            src.backup(dst)
            return _max_rowid(dst)
        finally:
            dst.close()
            src.close()
    db = sqlite3.connect(f"file:{dest}", uri=True)  # URI names on: the ATTACH below opens `local` read-only
    try:
        db.execute("ATTACH DATABASE ? AS src", (f"file:{local}?mode=ro",))
        with db:  # one read transaction: the highest rowid and the rows copied agree
            top = _max_rowid(db, "src")
            db.execute("CREATE TABLE generations AS SELECT * FROM src.generations WHERE rowid > ? AND rowid <= ?",
                       (after_rowid, top))
        return top
    finally:
        db.close()


def push_cache(local: Path, uri: str, after_rowid: int = 0) -> int:
    """Upload the cache at `local`: whole to `uri` (after_rowid 0), else the rows added after `after_rowid` as
    a new segment beside it. Returns the highest rowid now on the URI (0, nothing uploaded: no cache)."""
    if not local.is_file():
        return 0
    snap = Path(tempfile.mkdtemp(prefix="s3ray-cache-")) / "snapshot.sqlite"
    try:
        top = _write_snapshot(local, snap, after_rowid)
        if top <= after_rowid:
            return after_rowid
        if after_rowid:
            storage.upload(snap, storage.join(_segments(uri), f"seg-{top:012d}.sqlite"))
        else:
            old = storage.list_dir(_segments(uri))
            storage.upload(snap, uri)
            for name in old:  # the new base holds their rows; a crash before this only leaves duplicates
                storage.delete(storage.join(_segments(uri), name))
        return top
    finally:
        snap.unlink(missing_ok=True)
        snap.parent.rmdir()


def _merge_into(local: Path, other: Path) -> None:
    db = sqlite3.connect(str(local))
    try:
        with db:
            db.execute("ATTACH DATABASE ? AS other", (str(other),))
            db.execute("INSERT OR IGNORE INTO generations SELECT * FROM other.generations")
        db.execute("DETACH DATABASE other")
    finally:
        db.close()


def pull_cache(uri: str, local: Path) -> None:
    """Bring the cache at `uri` (base and segments) into `local`: the base is downloaded when there is no local
    cache, else its rows are added (a local cache may hold calls made after the last push; the remote one
    calls made on another head)."""
    segments = storage.list_dir(_segments(uri))
    if not local.exists():
        if storage.download(uri, local):
            log.info("teacher cache: restored from %s", uri)
    else:
        _pull_one(uri, local)
    for name in segments:
        _pull_one(storage.join(_segments(uri), name), local)


def _pull_one(uri: str, local: Path) -> None:
    from s3ray.teacher.cache import GenerationCache

    tmp = local.with_name(f".{local.name}.remote-{uuid.uuid4().hex}")
    try:
        if storage.download(uri, tmp):
            GenerationCache(local).close()  # the table with its key, should a segment come before any base
            _merge_into(local, tmp)
            log.info("teacher cache: merged %s into %s", uri, local)
    finally:
        tmp.unlink(missing_ok=True)


class CacheSync:
    """Pushes the local cache to `uri` every `interval_s` while it grows (a background thread), and on
    `push()` / `stop()`: the first push of a process uploads it whole, later ones only the new rows. Pulls
    the remote copy when created."""

    def __init__(self, local: Path, uri: str, interval_s: float = 30.0) -> None:
        self.local, self.uri, self.interval_s = Path(local), uri, interval_s
        self._lock = threading.Lock()
        self._pushed_rowid, self._segments = 0, 0
        self._stop = threading.Event()
        pull_cache(uri, self.local)
        self._thread = threading.Thread(target=self._loop, name="s3ray-cache-sync", daemon=True)
        self._thread.start()

    def push(self) -> None:
        with self._lock:
            whole = self._pushed_rowid == 0 or self._segments >= MAX_SEGMENTS
            try:
                top = push_cache(self.local, self.uri, 0 if whole else self._pushed_rowid)
            except OSError as exc:  # the next push tries again; a lost push only costs regeneration
                log.warning("teacher cache: upload to %s failed (%s); retried at the next push", self.uri, exc)
                return
            if whole:
                self._segments = 0
            elif top > self._pushed_rowid:  # a segment went up
                self._segments += 1
            self._pushed_rowid = top

    def _changed(self) -> bool:
        try:
            db = sqlite3.connect(f"file:{self.local}?mode=ro", uri=True)
            try:
                return _max_rowid(db) != self._pushed_rowid
            finally:
                db.close()
        except sqlite3.Error:
            return False

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self._changed():
                self.push()

    def stop(self) -> None:
        """Stop the thread and push the cache one last time."""
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 5)
        self.push()


class Stopped(KeyboardInterrupt):
    """SIGTERM (`ray job stop`, a pod eviction): unwinds like Ctrl-C, so `finally` blocks push the cache."""


def _raise_stopped(signum, frame) -> None:
    raise Stopped(f"signal {signum}")


@contextmanager
def sigterm_unwinds():
    """Within the block, SIGTERM raises `Stopped` in the main thread instead of ending the process at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
