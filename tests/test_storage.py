"""Run storage: URIs, atomic writes, staging folders, and jobs refusing a run dir they would lose.

The check that every Ray node sees the run dir runs on a real multi-node cluster with S3 in
tests/test_multinode_run.py (a node-local output_dir fails before generation; an s3:// one carries a run).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from s3ray import storage

TABLE = pa.table({"text": ["a fine film", "a dull film"], "label": [1, 0]})


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if ".tmp-" in p.name]


def test_relative_and_home_paths_become_absolute_and_uris_stay_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert storage.absolute_output_dir("runs/x") == str(tmp_path / "runs" / "x")
    assert storage.absolute_output_dir("~/runs/x") == str(tmp_path / "home" / "runs" / "x")
    assert storage.absolute_output_dir(f"file://{tmp_path}/r") == str(tmp_path / "r")
    assert storage.absolute_output_dir("s3://bucket/runs/x") == "s3://bucket/runs/x"
    assert storage.node_local_on_multinode("runs/x", alive_nodes=3)
    assert not storage.node_local_on_multinode("runs/x", alive_nodes=1)
    assert not storage.node_local_on_multinode("gs://bucket/runs/x", alive_nodes=3)


def test_an_s3_endpoint_variable_points_s3_uris_at_that_server(monkeypatch):
    monkeypatch.setenv("S3RAY_S3_ENDPOINT", "http://127.0.0.1:9")
    fs, path = storage.resolve("s3://bucket/runs/x/")
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/runs/x"
    monkeypatch.setenv("S3RAY_S3_ENDPOINT", "http://")
    with pytest.raises(storage.StorageError, match="S3RAY_S3_ENDPOINT"):
        storage.resolve("s3://bucket/x")


def test_atomic_parquet_and_bytes_round_trip_on_a_local_disk(tmp_path):
    uri = str(tmp_path / "run" / "round-0" / "train.parquet")
    storage.write_parquet(uri, TABLE)
    assert storage.read_parquet(uri).equals(TABLE)
    storage.write_parquet(uri, TABLE.slice(0, 1))  # replaces the whole file
    assert storage.read_parquet(uri).num_rows == 1
    storage.write_bytes(str(tmp_path / "run" / "manifest.json"), b"{}")
    assert storage.read_bytes(str(tmp_path / "run" / "manifest.json")) == b"{}"
    assert storage.list_dir(str(tmp_path / "run"), recursive=True) == [
        "manifest.json", "round-0", "round-0/train.parquet"]
    assert _no_temp_files(tmp_path)


def test_a_write_that_fails_half_way_leaves_the_old_file_and_no_temp_file(tmp_path):
    uri = str(tmp_path / "report.json")
    storage.write_bytes(uri, b"old")

    def half_then_fail(fs, path):
        with fs.open_output_stream(path) as f:
            f.write(b"new, half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        storage._atomic(uri, half_then_fail)
    assert storage.read_bytes(uri) == b"old"
    assert _no_temp_files(tmp_path)


def test_other_filesystems_come_through_fsspec_and_folders_stage_up_and_down(tmp_path):
    weights = tmp_path / "weights"
    (weights / "sub").mkdir(parents=True)
    (weights / "config.json").write_text("{}")
    (weights / "sub" / "model.safetensors").write_bytes(b"\0" * 10)
    storage.upload_dir(weights, "memory://s3ray-test/models/w")
    assert storage.list_dir("memory://s3ray-test/models/w", recursive=True) == [
        "config.json", "sub", "sub/model.safetensors"]
    local = storage.download_dir("memory://s3ray-test/models/w", tmp_path / "cache")
    assert (local / "sub" / "model.safetensors").read_bytes() == b"\0" * 10
    assert storage.download_dir("memory://s3ray-test/models/w", tmp_path / "cache") == local  # reused
    with pytest.raises(storage.StorageError, match="not a folder"):
        storage.download_dir("memory://s3ray-test/models/missing", tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [local.name]  # nothing half-made kept


def test_a_submitted_job_refuses_a_relative_run_dir_before_starting_anything(tmp_path):
    """Under `ray job submit --working-dir` a relative run dir lives in a temp copy Ray deletes at the end."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "RAY_JOB_ID": "02000000", "PYTHONPATH": str(repo)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "jobs/s3_job.py", "configs/sst2_quickstart.yaml"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "run.output_dir 'runs/sst2-quickstart' is relative" in done.stderr
    assert "s3://" in done.stderr and "Ray cluster" not in done.stderr  # refused before joining any cluster


def test_a_folder_is_replaced_whole_and_leaves_no_temp_copy(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "run" / "checkpoint"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "w.bin").write_bytes(b"new")
    dest.mkdir(parents=True)
    (dest / "stale.bin").write_bytes(b"old")
    assert storage.replace_local_dir(src, dest) == dest
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == ["sub", "sub/w.bin"]
    assert (dest / "sub" / "w.bin").read_bytes() == b"new" and _no_temp_files(tmp_path / "run")
    with pytest.raises(FileNotFoundError):  # a failed copy leaves the old folder and no temp copy
        storage.replace_local_dir(tmp_path / "missing", dest)
    assert (dest / "sub" / "w.bin").read_bytes() == b"new" and _no_temp_files(tmp_path / "run")


def test_the_finetune_job_refuses_a_relative_run_dir_too():
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "RAY_JOB_ID": "02000000", "PYTHONPATH": str(repo)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "jobs/finetune_job.py", "configs/finetune/sst2-smollm2-lora-cpu.yaml"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "run.output_dir 'runs/sst2-smollm2-lora-cpu' is relative" in done.stderr
