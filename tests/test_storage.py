"""Run storage: URIs, atomic writes, staging folders, and the check that every Ray node sees the run dir.

The multi-node tests share ONE local cluster (tests/multinode.py: a no-CPU head, a teacher node and a
student node, each with its own home, plus a moto S3 endpoint). Their driver runs in a subprocess so this
test process's own session Ray cluster stays untouched.
"""

from __future__ import annotations

import json
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


# ---- one local multi-node cluster for the rest of the module ----

def drive(s3_run: str, local_run: str, local_file: str) -> dict:
    """Driver side (runs in a subprocess joined to the test cluster): what the assertions below check."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from s3ray.runtime import init_ray

    init_ray(address="auto")  # RAY_ADDRESS names the test cluster
    roles = {"teacher_node": "teacher", "student_node": "student"}
    nodes = {next((r for k, r in roles.items() if k in n["Resources"]), "head"): n["NodeID"]
             for n in ray.nodes() if n["Alive"]}
    out: dict = {"nodes": nodes}
    storage.check_visible_from_all_nodes(s3_run)
    out["s3_visible"] = True
    try:
        storage.check_visible_from_all_nodes(local_run)
    except storage.StorageError as exc:
        out["local_error"] = str(exc)
    out["markers_left"] = storage.list_dir(storage.join(s3_run, ".s3ray-visibility"))

    def on(node: str, fn, *args):
        task = ray.remote(num_cpus=0)(fn).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[node], soft=False))
        return ray.get(task.remote(*args))

    uri = storage.join(s3_run, "round-0", "train.parquet")
    on("teacher", storage.write_parquet, uri, TABLE)
    out["s3_read_on_student"] = on("student", storage.read_parquet, uri).equals(TABLE)
    out["s3_read_on_driver"] = storage.read_parquet(uri).equals(TABLE)
    storage.write_parquet(local_file, TABLE)
    out["local_round_trip"] = storage.read_parquet(local_file).equals(TABLE)
    return out


@pytest.fixture(scope="module")
def cluster():
    from multinode import start_cluster

    c = start_cluster()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def driven(cluster):
    from multinode import run_driver

    done = run_driver(cluster, [__file__, "--drive", "s3://s3ray-runs/sst2", "~/runs/sst2",
                                str(cluster.root / "d" / "local" / "train.parquet")])
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_an_object_store_run_dir_is_visible_from_every_node_and_cleaned_up(driven):
    assert set(driven["nodes"]) == {"head", "teacher", "student"}
    assert driven["s3_visible"] is True
    assert driven["markers_left"] == []


@pytest.mark.slow
def test_a_node_local_run_dir_fails_naming_every_node_that_cannot_see_it(driven):
    err = driven["local_error"]
    assert "run.output_dir ~/runs/sst2" in err and "3 of 3 node(s)" in err
    for node_id in driven["nodes"].values():
        assert node_id[:12] in err
    assert "shared filesystem" in err and "s3://" in err


@pytest.mark.slow
def test_parquet_written_on_one_node_reads_back_on_another_through_s3(driven):
    assert driven["s3_read_on_student"] and driven["s3_read_on_driver"]
    assert driven["local_round_trip"]


@pytest.mark.slow
def test_stopping_the_cluster_leaves_nothing_running(cluster, driven):
    assert cluster.processes(), "the cluster should be running before it is stopped"
    cluster.stop()
    assert [n.proc.poll() is not None for n in cluster.nodes] == [True] * 3
    assert cluster.processes() == []


if __name__ == "__main__" and sys.argv[1:2] == ["--drive"]:
    print(json.dumps(drive(*sys.argv[2:5])))


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
