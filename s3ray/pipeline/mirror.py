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

def push_cache(local: Path, uri: str) -> int:
    """Upload a consistent snapshot of the SQLite cache at `local` (SQLite's online backup, so a writer in
    this process may go on); returns the rows it holds (0, and nothing uploaded, when there is no cache)."""
    if not local.is_file():
        return 0
    snap = Path(tempfile.mkdtemp(prefix="s3ray-cache-")) / "snapshot.sqlite"
    try:
        src = sqlite3.connect(f"file:{local}?mode=ro", uri=True)
        dst = sqlite3.connect(str(snap))
        try:
            src.backup(dst)
            rows = int(dst.execute("SELECT COUNT(*) FROM generations").fetchone()[0])
        except sqlite3.OperationalError:  # no table yet: nothing was ever cached
            return 0
        finally:
            dst.close()
            src.close()
        storage.upload(snap, uri)
        return rows
    finally:
        snap.unlink(missing_ok=True)
        snap.parent.rmdir()


def pull_cache(uri: str, local: Path) -> None:
    """Bring the cache at `uri` into `local`: download it when there is no local one, else add its rows
    (a local cache may hold calls made after the last push; the remote one calls made on another head)."""
    if not local.exists():
        if storage.download(uri, local):
            log.info("teacher cache: restored from %s", uri)
        return
    tmp = local.with_name(f".{local.name}.remote-{uuid.uuid4().hex}")
    try:
        if not storage.download(uri, tmp):
            return
        db = sqlite3.connect(str(local))
        try:
            with db:
                db.execute("ATTACH DATABASE ? AS remote", (str(tmp),))
                db.execute("INSERT OR IGNORE INTO generations SELECT * FROM remote.generations")
            db.execute("DETACH DATABASE remote")
        finally:
            db.close()
        log.info("teacher cache: merged %s into %s", uri, local)
    finally:
        tmp.unlink(missing_ok=True)


class CacheSync:
    """Pushes the local cache to `uri` every `interval_s` while it grows (a background thread), and on
    `push()` / `stop()`. Pulls the remote copy when created."""

    def __init__(self, local: Path, uri: str, interval_s: float = 30.0) -> None:
        self.local, self.uri, self.interval_s = Path(local), uri, interval_s
        self._lock = threading.Lock()
        self._pushed_rows = -1
        self._stop = threading.Event()
        pull_cache(uri, self.local)
        self._thread = threading.Thread(target=self._loop, name="s3ray-cache-sync", daemon=True)
        self._thread.start()

    def push(self) -> None:
        with self._lock:
            try:
                self._pushed_rows = push_cache(self.local, self.uri)
            except OSError as exc:  # the next push tries again; a lost push only costs regeneration
                log.warning("teacher cache: upload to %s failed (%s); retried at the next push", self.uri, exc)

    def _changed(self) -> bool:
        try:
            db = sqlite3.connect(f"file:{self.local}?mode=ro", uri=True)
            try:
                return int(db.execute("SELECT COUNT(*) FROM generations").fetchone()[0]) != self._pushed_rows
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
