"""The run directory and its manifest: what finished, what it produced, so `--resume` skips it.

Exactly once: every step writes its outputs first, durably (temp file with a unique name, fsync, rename,
fsync of the folder), and records itself in manifest.json last, with the size and a cheap hash of each
output. A crash between the two leaves the step unrecorded; on resume it runs again, and the teacher's
generation cache keeps it from regenerating examples that were already written. A recorded step whose
output no longer matches its record (a power loss before the data reached the disk, a truncated copy) is
run again too. One driver at a time: the run holds an exclusive lock on `run.lock` until it closes.

`run.output_dir` may be an object store URI (s3://...): the driver then works in a node-local copy and pushes
every output to the URI before the manifest that records it (mirror.py), and a start reads the run from the
URI, so a driver on another machine resumes it. (An object store has no lock: one job per run dir.)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from s3ray import storage
from s3ray.pipeline import mirror
from s3ray.redact import redact

log = logging.getLogger("s3ray")

# Config sections that may change between a run and its resume (they don't change results).
_RESUMABLE_CHANGES = {"ray", "run.local_dir", "teacher.resources", "student.resources", "mining.concurrency", "mining.batch_size", "teacher.replicas", "teacher.max_in_flight",
                      "teacher.openai", "teacher.max_attempts", "teacher.start_timeout_s", "teacher.request_timeout_s",
                      "teacher.max_restarts", "synthesis.max_failed_call_fraction", "run.output_dir", "run.seeds",
                      "run.parallel_seeds", "student.cpus_per_worker",
                      "baselines"}
DATA_FIELDS = ("validation", "test", "contexts")
LOCK_NAME = "run.lock"
# A cheap hash reads this much from each end of a file: enough to notice truncation and torn writes.
_EDGE = 1 << 16


class RunDirError(RuntimeError):
    pass


# --- durable files --------------------------------------------------------------------------------
def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` so that after a crash or power loss it holds either the old or the new bytes
    (storage.write_bytes: a unique temp name, fsync, rename, fsync of the folder)."""
    storage.write_bytes(str(path), data)
    return Path(path)


def write_parquet(path: str | Path, table: pa.Table) -> Path:
    """`pq.write_table`, durably and atomically (see atomic_write_bytes)."""
    storage.write_parquet(str(path), table)
    return Path(path)


def _files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file())


def fingerprint(path: str | Path, full: bool = False) -> dict:
    """Size and hash of a file or folder. Cheap by default (size plus both ends of each file);
    `full=True` hashes every byte (data files, whose change must be noticed anywhere)."""
    path = Path(path)
    h = hashlib.sha256()
    size = 0
    for f in _files_under(path):
        n = f.stat().st_size
        size += n
        h.update(f"{f.relative_to(path) if f != path else ''}\0{n}\0".encode())
        with open(f, "rb") as fh:
            if full or n <= 2 * _EDGE:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            else:
                h.update(fh.read(_EDGE))
                fh.seek(-_EDGE, os.SEEK_END)
                h.update(fh.read(_EDGE))
    return {"size": size, "sha256" if full else "hash": h.hexdigest()}


def _unsound(path: Path, rec: dict) -> str | None:
    """Why the output at `path` does not match its record, or None when it does."""
    if not path.exists():
        return "is missing"
    now = fingerprint(path)
    if now["size"] != rec.get("size"):
        return f"has {now['size']} bytes, {rec.get('size')} were recorded"
    if now["hash"] != rec.get("hash"):
        return "changed since it was recorded"
    for f in _files_under(path):
        if f.suffix == ".parquet":
            try:
                pq.ParquetFile(f).metadata  # noqa: B018 - reading the footer is the check
            except (pa.ArrowException, OSError) as e:
                return f"is not readable Parquet ({f.name}: {e})"
    return None


# --- the run --------------------------------------------------------------------------------------
def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def holds_run(path: str | Path) -> bool:
    """Whether a run was started in `path` (a path or URI): it has a manifest."""
    return storage.exists(storage.join(str(path), "manifest.json"))


def check_can_open(path: str | Path, resume: bool) -> None:
    """Refuse a run dir (path or URI) that --resume/no --resume cannot use, before any expensive work starts."""
    has_manifest = holds_run(path)
    if resume and not has_manifest:
        what = "does not exist" if not storage.exists(str(path)) else "holds no manifest.json (no run was started there)"
        raise RunDirError(f"cannot resume: {path} {what}; drop --resume to start a new run")
    if resume:
        read_manifest(path)  # a corrupt manifest is refused here, before any model loads
    if not resume and has_manifest:
        raise RunDirError(f"{path} already holds a run; add --resume to continue it, or set run.output_dir "
                          "to a new folder")


def read_manifest(path: str | Path) -> dict:
    """A run's manifest.json (path or URI), checked to be one; errors name the file and what to do."""
    mpath = storage.join(str(path), "manifest.json")
    if not storage.exists(mpath):
        raise RunDirError(f"{path}: no manifest.json here; point at a run's run.output_dir")
    try:
        manifest = json.loads(storage.read_bytes(mpath).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(f"{mpath} is corrupt ({e}); restore it from a backup or start a new run_dir") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict) \
            or not isinstance(manifest.get("steps"), dict):
        raise RunDirError(f"{mpath} is not an s3ray manifest (needs 'config' and 'steps'); start a new run_dir")
    return manifest


class RunDir:
    def __init__(self, path: str | Path, config: dict, resume: bool, local_dir: str | None = None):
        self.uri = storage.absolute_output_dir(str(path))
        self.remote = not storage.is_local(self.uri)  # an object store: work in a local copy, mirror to it
        # Results record paths relative to `path`, the (local copy of the) run dir.
        self.path = mirror.working_copy(self.uri, local_dir) if self.remote else Path(path).expanduser().resolve()
        self.manifest_path = self.path / "manifest.json"
        self._lock_fd: int | None = None
        config = redact(config)
        if resume:  # nothing to resume: refused before anything is created
            check_can_open(self.uri if self.remote else self.path, resume)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock()  # before the other checks: a second driver learns that the run is in use, and by whom
        try:
            check_can_open(self.uri if self.remote else self.path, resume)
            if resume:
                self.manifest = read_manifest(self.uri if self.remote else self.path)
                self._check_same_config(self.manifest["config"], config)
                self._check_data(config)
            else:
                self.manifest = {"config": config, "steps": {}, "files": {}, "created": time.time(),
                                 "data": _data_fingerprints(config)}
                self._save()
        except BaseException:
            self.close()
            raise

    @classmethod
    def open_existing(cls, path: str | Path, local_dir: str | None = None) -> RunDir:
        """A finished or running run, read-only (no lock, no config check): for reports."""
        run = cls.__new__(cls)
        run.uri, run._lock_fd = storage.absolute_output_dir(str(path)), None
        run.remote = not storage.is_local(run.uri)
        run.path = mirror.working_copy(run.uri, local_dir) if run.remote else Path(path)
        run.manifest_path = run.path / "manifest.json"
        run.manifest = read_manifest(run.uri if run.remote else run.path)
        return run

    # --- one driver at a time ---------------------------------------------------------------------
    def _lock(self) -> None:
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(f"{self.path} is in use by another s3ray driver (pid {holder}); wait for it to "
                              "finish or stop it, or set run.output_dir to a new folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    @property
    def holds_lock(self) -> bool:
        """Whether this object is the run's driver (`open_existing` readers never are)."""
        return getattr(self, "_lock_fd", None) is not None

    def close(self) -> None:
        """Release the run's lock (also released when the process exits)."""
        fd = getattr(self, "_lock_fd", None)  # None too when __init__ failed early
        if fd is not None:
            self._lock_fd = None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __del__(self) -> None:
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- resume checks ----------------------------------------------------------------------------
    @staticmethod
    def _check_same_config(old: dict, new: dict) -> None:
        a, b = _flatten(old), _flatten(new)
        changed = [
            k for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not any(k == p or k.startswith(p + ".") for p in _RESUMABLE_CHANGES)
        ]
        if changed:
            raise RunDirError(
                "cannot resume: the config changed in " + ", ".join(f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in changed)
                + ". Restore those values, or start a new run in another run.output_dir"
            )

    def _check_data(self, config: dict) -> None:
        recorded = self.manifest.setdefault("data", {})
        for key, fp in _data_fingerprints(config).items():
            old = recorded.get(key)
            if old is None:  # a run started before data files were fingerprinted
                recorded[key] = fp
            elif old["sha256"] != fp["sha256"]:
                raise RunDirError(f"{key}: {fp['path']} changed since this run started (sha256 {old['sha256'][:12]}"
                                  f" -> {fp['sha256'][:12]}); restore it or start a new run_dir")

    def _save(self) -> None:
        data = json.dumps(self.manifest, indent=2, default=str).encode()
        atomic_write_bytes(self.manifest_path, data)
        if self.remote:  # last: the outputs it records were pushed before
            storage.write_bytes(storage.join(self.uri, "manifest.json"), data)

    # --- the run's storage (a URI) and its local copy ---------------------------------------------
    def uri_of(self, rel: str) -> str:
        """Where workers on any node read or write `rel`: the URI for an object store run, else the path."""
        return storage.join(self.uri, rel) if self.remote else str(self.abs(rel))

    def push(self, rel: str) -> None:
        """Copy the local file or folder `rel` to the run's URI (nothing to do for a local run dir)."""
        if self.remote and self.abs(rel).exists():
            storage.upload(self.abs(rel), self.uri_of(rel))

    def pull(self, rel: str) -> bool:
        """Bring `rel` from the run's URI into the local copy (False when the URI has none)."""
        return self.remote and storage.download(self.uri_of(rel), self.abs(rel))

    # --- paths ------------------------------------------------------------------------------------
    def rel(self, path: str | Path) -> str:
        """`path` relative to the run dir (what the manifest stores, so a moved run still resolves);
        a path outside the run dir stays as it is."""
        p = Path(path)
        if not p.is_absolute():
            return str(p)
        try:
            return str(p.resolve().relative_to(self.path.resolve()))
        except ValueError:
            return str(p)

    def abs(self, rel: str | Path) -> Path:
        """Where a path recorded in the manifest lies now."""
        p = Path(rel)
        return p if p.is_absolute() else self.path / p

    # --- steps ------------------------------------------------------------------------------------
    def done(self, step: str) -> bool:
        """The step finished and every output it recorded is still what it wrote."""
        rec = self.manifest["steps"].get(step)
        if rec is None:
            return False
        for rel, fp in rec.get("outputs", {}).items():
            why = _unsound(self.abs(rel), fp)
            if why and self.pull(rel):  # this node's copy lacks it: the run's storage has it
                why = _unsound(self.abs(rel), fp)
            if why:
                log.warning("step %s is run again: its output %s %s", step, self.abs(rel), why)
                del self.manifest["steps"][step]
                self._save()
                return False
        return True

    def result(self, step: str) -> dict:
        return self.manifest["steps"][step]["result"]

    def finish(self, step: str, result: dict, seconds: float, outputs: list[str] | None = None) -> dict:
        """Record `step` as done, with the size and hash of each output (paths relative to the run dir)."""
        recorded = {self.rel(o): fingerprint(self.abs(o)) for o in outputs or []}
        for rel in recorded:
            self.push(rel)
        self.manifest["steps"][step] = {"result": result, "seconds": round(seconds, 2), "finished": time.time(),
                                        "outputs": recorded}
        self._save()
        return result

    def outputs_in(self, result: dict, keys: tuple[str, ...] = ("path", "checkpoint", "errors_path")) -> list[str]:
        """The files/folders a step result names under `keys` that lie inside this run dir."""
        out = []
        for k in keys:
            v = result.get(k) if isinstance(result, dict) else None
            if isinstance(v, str) and self.abs(v).exists():
                rel = self.rel(self.abs(v))
                if not Path(rel).is_absolute():
                    out.append(rel)
        return out

    def steps(self) -> dict:
        return self.manifest["steps"]

    # --- files ------------------------------------------------------------------------------------
    def file(self, rel: str) -> Path:
        p = self.path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_parquet(self, rel: str, table: pa.Table) -> str:
        out = str(write_parquet(self.path / rel, table))
        self.push(rel)
        return out

    def write_parquet_once(self, rel: str, make_table) -> str:
        """Write `make_table()` to `rel` unless a sound copy recorded earlier is there already."""
        files = self.manifest.setdefault("files", {})
        p = self.path / rel
        if rel in files and (_unsound(p, files[rel]) is None or (self.pull(rel) and _unsound(p, files[rel]) is None)):
            return str(p)
        write_parquet(p, make_table())
        self.push(rel)
        files[rel] = fingerprint(p)
        self._save()
        return str(p)

    def read_parquet(self, rel: str) -> list[dict]:
        return pq.read_table(self.abs(rel)).to_pylist()


def _data_fingerprints(config: dict) -> dict:
    """Full sha256 of each data file the config names, keyed `data.<field>`."""
    data = config.get("data") or {}
    out = {}
    for name in DATA_FIELDS:
        path = data.get(name)
        if path and Path(path).expanduser().exists():
            out[f"data.{name}"] = {"path": str(path), **fingerprint(Path(path).expanduser(), full=True)}
    return out
