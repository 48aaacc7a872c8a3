"""Capacity, deadlines and per-node sizing on a real local multi-node Ray cluster (tests/multinode.py): a head
with no CPUs and two worker nodes of 2 CPUs and 2 simulated GPUs each (`ray start --num-gpus`). Drivers run
in subprocesses, so this test process's own session Ray cluster stays untouched.

- `s3ray validate` / `s3ray run` (the CLI's `main`, in one driver subprocess: one Ray connection for every
  case) with a config that needs more GPUs or CPUs than the cluster has free fail at start with exit code 2
  and one line naming the numbers and the fix, before any model loads or run directory exists.
- A replica that cannot be placed (every GPU held by another placement group) fails at teacher.start_timeout_s
  naming its bundle shape and the free resources per node, and leaves no placement group behind.
- Student worker CPUs are sized per node (2, not the cluster's 4) and really place.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "sst2_quickstart.yaml")


@pytest.fixture(scope="module")
def cluster():
    from multinode import start_cluster

    c = start_cluster(gpus_per_worker=2, worker_cpus=2, with_s3=False)
    yield c
    c.stop()


def _one_error_line(done: dict) -> str:
    errors = [line for line in done["stderr"].splitlines() if line.startswith("error:")]
    assert done["rc"] == 2 and len(errors) == 1, done["stderr"][-3000:]
    return errors[0]


def test_validate_refuses_more_teacher_gpus_than_are_free(driven):
    done = driven["cli"]["teacher_gpus"]
    err = _one_error_line(done)
    assert "teacher.replicas=3 replicas of 2 GPU + 2 CPU each need 6 GPU + 6 CPU, but only 2 fit" in err
    assert err.count(": 2 CPU, 2 GPU") == 2 and "lower teacher.replicas to 2" in err
    assert "config ok" not in done["stdout"]


def test_run_refuses_more_student_gpus_than_the_cluster_has_before_any_work(driven):
    done = driven["cli"]["student_gpus"]
    err = _one_error_line(done)
    assert "student (student.num_workers=5) need 5 x 1 GPU + 1 CPU, but only 4 fit" in err, err
    assert "lower student.num_workers to 4" in err
    assert not done["run_dir_exists"]  # no run directory, so nothing generated
    assert driven["models_converted"] == []  # no model was even loaded


def test_run_refuses_more_student_cpus_than_any_node_has(driven):
    done = driven["cli"]["student_cpus"]
    err = _one_error_line(done)
    assert "need 3 x 2 CPU, but only 2 fit" in err and "student.cpus_per_worker (now 2)" in err, err
    assert not done["run_dir_exists"]


@pytest.fixture(scope="module")
def driven(cluster):
    from multinode import run_driver

    done = run_driver(cluster, [__file__, "--drive"], timeout_s=240)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_student_worker_cpus_are_sized_per_node_and_place(driven):
    assert driven["total_cpus"] == 4
    assert driven["cpus"] == {"one": 2, "two": 2, "gpu": 2}  # a node's CPUs, never the cluster's 4
    assert driven["two_workers_placed"]
    assert driven["one_worker_ran_on"] in ("teacher", "student")


def test_a_replica_that_cannot_be_placed_fails_at_its_deadline_naming_shapes_and_free_resources(driven):
    err = driven["deadline_error"]
    assert "teacher replica 0 could not be placed within teacher.start_timeout_s=4 s" in err, err
    assert "it needs 1 GPU + 1 CPU" in err and err.count(": 2 CPU, 0 GPU") == 2  # what is free per node
    assert 4 <= driven["deadline_seconds"] < 30
    assert driven["pending_groups"] == []  # the replica's placement group was removed


def _cli(command: str, *sets: str) -> dict:
    """`s3ray COMMAND` on the quickstart config, in this driver (one Ray connection for every case)."""
    from s3ray.cli import main

    run_dir = Path(os.environ["HOME"]) / "runs" / command
    args = [command, CONFIG, "--set", f"ray.address={os.environ['RAY_ADDRESS']}", "--set", f"run.output_dir={run_dir}"]
    for s in sets:
        args += ["--set", s]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(args)
    return {"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue(), "run_dir_exists": run_dir.exists()}


def drive() -> dict:
    """In the driver subprocess: the CLI's start checks, per-node sizing with a real placement, then a
    replica past its deadline."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    from s3ray.config import StudentConfig, TeacherConfig
    from s3ray.runtime import init_ray, node_resources
    from s3ray.student.train import _cluster_worker_cpus
    from s3ray.teacher.ray_pool import RayReplicaPool
    from s3ray.teacher.types import TeacherError

    cli = {"teacher_gpus": _cli("validate", "teacher.replicas=3", "teacher.tensor_parallel_size=2"),
           "student_gpus": _cli("run", "student.use_gpu=true", "student.num_workers=5"),
           "student_cpus": _cli("run", "teacher.use_gpu=false", "student.num_workers=3", "student.cpus_per_worker=2")}
    models = [p.name for p in Path(os.environ["S3RAY_CACHE"]).iterdir()]
    init_ray(address=os.environ["RAY_ADDRESS"])  # joined already by the CLI
    names = {n.node_id: next((k[:-5] for k in n.total if k.endswith("_node")), "head") for n in node_resources()}
    cpus = {"one": _cluster_worker_cpus(StudentConfig(num_workers=1), 1),
            "two": _cluster_worker_cpus(StudentConfig(num_workers=2), 2),
            "gpu": _cluster_worker_cpus(StudentConfig(num_workers=1, use_gpu=True), 1)}
    out: dict = {"cli": cli, "models_converted": models, "cpus": cpus, "total_cpus": ray.cluster_resources()["CPU"]}
    group = placement_group([{"CPU": cpus["two"]}] * 2, strategy="PACK")  # as Ray Train places its workers
    out["two_workers_placed"] = bool(ray.wait([group.ready()], timeout=60)[0])
    remove_placement_group(group)
    where = ray.remote(num_cpus=cpus["one"])(lambda: ray.get_runtime_context().get_node_id())
    out["one_worker_ran_on"] = names[ray.get(where.remote(), timeout=60)]

    blocker = placement_group([{"GPU": 2}, {"GPU": 2}], strategy="STRICT_SPREAD")  # every GPU taken
    ray.get(blocker.ready(), timeout=60)
    t0 = time.monotonic()
    try:
        RayReplicaPool(TeacherConfig(engine="transformers", start_timeout_s=4), "/nowhere", run_seed=0)
    except TeacherError as e:
        out["deadline_error"] = str(e)
    out["deadline_seconds"] = time.monotonic() - t0
    remove_placement_group(blocker)
    time.sleep(1)
    out["pending_groups"] = [g["bundles"] for g in placement_group_table().values() if g["state"] != "REMOVED"]
    return out


if __name__ == "__main__" and sys.argv[1:2] == ["--drive"]:
    print(json.dumps(drive()))
