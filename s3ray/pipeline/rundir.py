"""The run directory and its manifest: what finished, what it produced, so `--resume` skips it.

Every step writes its outputs first (atomically: temp file, then rename) and records itself in
manifest.json last. A crash between the two leaves the step unrecorded; on resume it runs again and
overwrites its half-written outputs, and the teacher's generation cache keeps it from regenerating
examples that were already written.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# Config sections that may change between a run and its resume (they don't change results).
_RESUMABLE_CHANGES = {"ray", "mining.concurrency", "mining.batch_size", "teacher.replicas", "teacher.max_in_flight",
                      "teacher.openai", "run.output_dir"}


class RunDirError(RuntimeError):
    pass


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: str | Path, config: dict, resume: bool):
        self.path = Path(path)
        self.manifest_path = self.path / "manifest.json"
        if self.manifest_path.exists():
            if not resume:
                raise RunDirError(
                    f"{self.path} already holds a run; add --resume to continue it, or set run.output_dir "
                    "to a new folder"
                )
            self.manifest = json.loads(self.manifest_path.read_text())
            self._check_same_config(self.manifest["config"], config)
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            self.manifest = {"config": config, "steps": {}, "created": time.time()}
            self._save()

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

    def _save(self) -> None:
        _atomic_write_text(self.manifest_path, json.dumps(self.manifest, indent=2, default=str))

    # --- steps ------------------------------------------------------------------------------------
    def done(self, step: str) -> bool:
        return step in self.manifest["steps"]

    def result(self, step: str) -> dict:
        return self.manifest["steps"][step]["result"]

    def finish(self, step: str, result: dict, seconds: float) -> dict:
        self.manifest["steps"][step] = {"result": result, "seconds": round(seconds, 2), "finished": time.time()}
        self._save()
        return result

    def steps(self) -> dict:
        return self.manifest["steps"]

    # --- files ------------------------------------------------------------------------------------
    def file(self, rel: str) -> Path:
        p = self.path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_parquet(self, rel: str, table: pa.Table) -> str:
        p = self.file(rel)
        tmp = p.with_name(p.name + ".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, p)
        return str(p)

    def rel(self, path: str | Path) -> str:
        """`path` relative to the run directory, as results record it (a moved run still finds it)."""
        return os.path.relpath(Path(path).resolve(), self.path.resolve())

    def abs(self, rel: str | Path) -> Path:
        """A recorded path in this run directory (absolute paths of older manifests pass through)."""
        return self.path / rel

    def read_parquet(self, rel: str) -> list[dict]:
        return pq.read_table(self.path / rel).to_pylist()
