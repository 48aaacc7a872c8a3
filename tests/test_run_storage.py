"""A run whose run.output_dir is an object store URI (issue 11), on fsspec's in-memory filesystem: the local
working copy is mirrored to the URI, a driver on another machine resumes from the URI alone, the teacher
cache travels with the run, and model folders are staged once and resolved on each node.
(tests/test_multinode_run.py runs the same paths against S3 on a multi-node Ray cluster.)"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pyarrow as pa
import pytest

from s3ray import models, storage
from s3ray.pipeline import mirror
from s3ray.pipeline.rundir import RunDir, RunDirError
from s3ray.teacher.cache import GenerationCache
from s3ray.teacher.types import GenerationRequest, GenerationResult

TABLE = pa.table({"id": ["a", "b"], "text": ["a fine film", "a dull film"]})


@pytest.fixture
def uri() -> str:
    return f"memory://s3ray-test/{uuid.uuid4().hex}/run"


def _steps(run: RunDir) -> None:
    run.write_parquet_once("data/validation.parquet", lambda: TABLE)
    run.write_parquet("rounds/round_0.parquet", TABLE)
    ckpt = run.path / "students" / "round0" / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"\1" * 100)
    run.finish("round0/synthesis", {"path": "rounds/round_0.parquet", "rows": 2}, 1.0,
               outputs=["rounds/round_0.parquet"])
    run.finish("round0/train", {"checkpoint": "students/round0/checkpoint"}, 1.0,
               outputs=["students/round0/checkpoint"])


def test_an_object_store_run_resumes_on_another_machine_from_the_uri_alone(uri, tmp_path):
    with pytest.raises(RunDirError, match="cannot resume"):
        RunDir(uri, {"x": 1}, resume=True, local_dir=str(tmp_path / "nothing"))
    run = RunDir(uri, {"x": 1}, resume=False, local_dir=str(tmp_path / "head1"))
    assert run.remote and run.path == tmp_path / "head1"
    _steps(run)
    run.close()
    assert {"manifest.json", "data/validation.parquet", "rounds/round_0.parquet",
            "students/round0/checkpoint/model.safetensors"} <= set(storage.list_dir(uri, recursive=True))

    again = RunDir(uri, {"x": 1}, resume=True, local_dir=str(tmp_path / "head2"))  # an empty local copy
    assert again.done("round0/synthesis") and again.done("round0/train")
    assert (tmp_path / "head2" / "students/round0/checkpoint/model.safetensors").read_bytes() == b"\1" * 100
    assert again.read_parquet("rounds/round_0.parquet") == TABLE.to_pylist()
    assert again.write_parquet_once("data/validation.parquet", lambda: pytest.fail("rewritten")).endswith(
        "validation.parquet")
    again.close()
    with pytest.raises(RunDirError, match="already holds a run"):
        RunDir(uri, {"x": 1}, resume=False, local_dir=str(tmp_path / "head3"))


def test_an_output_lost_everywhere_runs_its_step_again(uri, tmp_path):
    run = RunDir(uri, {"x": 1}, resume=False, local_dir=str(tmp_path / "head1"))
    _steps(run)
    run.close()
    storage.delete_dir(storage.join(uri, "students"))
    again = RunDir(uri, {"x": 1}, resume=True, local_dir=str(tmp_path / "head2"))
    assert again.done("round0/synthesis") and not again.done("round0/train")
    assert "round0/train" not in RunDir.open_existing(uri, local_dir=str(tmp_path / "r")).steps()
    again.close()


def _req(i: int) -> GenerationRequest:
    return GenerationRequest(request_id=f"r{i}", messages=({"role": "user", "content": f"q{i}"},))


def _cache(path, ids) -> None:
    with GenerationCache(path) as c:
        c.put_many([(_req(i), GenerationResult(f"r{i}", text=f"a{i}")) for i in ids], "m")


def test_the_teacher_cache_travels_with_the_run_and_merges_with_a_local_one(uri, tmp_path):
    remote = storage.join(uri, "teacher_cache.sqlite")
    _cache(tmp_path / "a.sqlite", [1, 2])
    assert mirror.push_cache(tmp_path / "a.sqlite", remote) == 2
    mirror.pull_cache(remote, tmp_path / "b.sqlite")  # no local cache: downloaded
    _cache(tmp_path / "c.sqlite", [3])
    mirror.pull_cache(remote, tmp_path / "c.sqlite")  # a local cache: merged
    for name, ids in (("b", {"r1", "r2"}), ("c", {"r1", "r2", "r3"})):
        with GenerationCache(tmp_path / f"{name}.sqlite") as c:
            assert set(c.get_many([_req(i) for i in (1, 2, 3)], "m")) == ids
    sync = mirror.CacheSync(tmp_path / "c.sqlite", remote, interval_s=3600)
    sync.stop()  # pushes once more
    mirror.pull_cache(remote, tmp_path / "d.sqlite")
    with GenerationCache(tmp_path / "d.sqlite") as c:
        assert len(c) == 3


def _rows(path) -> int:
    with GenerationCache(path) as c:
        return len(c)


def test_cache_pushes_after_the_first_send_only_new_rows_and_are_compacted(uri, tmp_path, monkeypatch):
    """At corpus scale the cache is GBs: after one whole upload per process, a push sends only the rows added
    since the last one (a segment); every MAX_SEGMENTS pushes a new whole copy replaces the segments."""
    monkeypatch.setattr(mirror, "MAX_SEGMENTS", 2)
    remote, local = storage.join(uri, "teacher_cache.sqlite"), tmp_path / "l.sqlite"
    parts = f"{remote}.parts"
    _cache(local, [1, 2])
    sync = mirror.CacheSync(local, remote, interval_s=3600)
    sync.push()  # the process's first push: whole
    sync.push()  # nothing new: nothing sent
    assert storage.exists(remote) and storage.list_dir(parts) == []
    _cache(local, [3])
    sync.push()
    (seg,) = storage.list_dir(parts)
    assert storage.download(storage.join(parts, seg), tmp_path / "seg.sqlite")
    assert _rows(tmp_path / "seg.sqlite") == 1  # only the new row travelled
    _cache(local, [4])
    sync.push()
    assert len(storage.list_dir(parts)) == 2
    mirror.pull_cache(remote, tmp_path / "fresh.sqlite")  # base + segments
    assert _rows(tmp_path / "fresh.sqlite") == 4
    _cache(local, [5])
    sync.stop()  # a third segment would pass MAX_SEGMENTS: a whole copy instead, segments deleted
    assert storage.list_dir(parts) == []
    mirror.pull_cache(remote, tmp_path / "fresh2.sqlite")
    assert _rows(tmp_path / "fresh2.sqlite") == 5
    mirror.pull_cache(remote, tmp_path / "fresh.sqlite")  # merging again adds nothing twice
    assert _rows(tmp_path / "fresh.sqlite") == 5


def test_a_local_model_folder_is_staged_once_and_resolved_on_each_node(uri, tmp_path, monkeypatch):
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    assert models.portable(str(folder), str(folder), uri, stage=False) == str(folder)
    assert models.portable(models.EMBEDDED_STUDENT, "/x", uri, stage=True) == models.EMBEDDED_STUDENT
    staged = models.portable(str(folder), str(folder), uri, stage=True)
    assert staged.startswith(storage.join(uri, "models/tiny-"))
    assert models.portable(str(folder), str(folder), uri, stage=True) == staged  # once
    monkeypatch.setenv("S3RAY_CACHE", str(tmp_path / "node"))  # another node's cache
    local = models.on_this_node(staged)
    assert local.startswith(str(tmp_path / "node")) and (tmp_path / "node").exists()
    assert (Path(local) / "model.safetensors").read_bytes() == b"\0" * 64
    with models.loaded_from(staged) as fresh:  # a checkpoint: a fresh copy, gone once loaded
        assert fresh != local and (Path(fresh) / "config.json").read_text() == "{}"
    assert not Path(fresh).exists() and list((tmp_path / "node" / "tmp").iterdir()) == []
    with models.loaded_from(str(folder)) as same:
        assert same == str(folder)
    assert folder.is_dir()
    assert models.on_this_node(str(folder)) == str(folder)


def test_s3ray_report_rebuilds_the_report_of_an_object_store_run_from_the_uri(uri, tmp_path, monkeypatch, capsys):
    from s3ray.cli import main
    from s3ray.config import load_config

    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs/sst2_quickstart.yaml"), [])
    run = RunDir(uri, cfg.model_dump(mode="json"), resume=False, local_dir=str(tmp_path / "head1"))
    _steps(run)
    (run.path / "run.log").write_text("the driver's log\n")
    run.push("run.log")
    run.close()
    monkeypatch.setenv("S3RAY_CACHE", str(tmp_path / "laptop"))  # another machine, with an old copy's log
    stale = mirror.working_copy(uri) / "run.log"
    stale.parent.mkdir(parents=True)
    stale.write_text("an old log\n")
    assert main(["report", uri]) == 0
    assert f"wrote {uri}/report.md" in capsys.readouterr().out
    rep = json.loads(storage.read_bytes(storage.join(uri, "report.json")))
    rows = {r["round"]: r for r in rep["rounds"]}
    assert rows[0]["new_rows"] == 2 and rows[1]["new_rows"] is None
    assert "| 0 | 2 |" in storage.read_bytes(storage.join(uri, "report.md")).decode()
    assert storage.read_bytes(storage.join(uri, "report.png")).startswith(b"\x89PNG")
    assert storage.read_bytes(storage.join(uri, "run.log")) == b"the driver's log\n"  # not the reader's
