"""Capacity arithmetic on given node shapes (no Ray, milliseconds): per-node packing, the start check's
errors and fixes, when the teacher must release its GPUs, and student CPU sizing per node. The same checks
on a real multi-node cluster are in test_capacity_cluster.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from s3ray.capacity import CapacityError, Node, place, plan_capacity, seeds_side_by_side, worker_cpus
from s3ray.config import ConfigError, S3Config, load_config

REPO = Path(__file__).resolve().parents[1]


def _nodes(*shapes: tuple[float, float]) -> list[Node]:
    """Idle nodes of (CPUs, GPUs)."""
    return [Node(f"node{i:04d}ffff", {"CPU": c, "GPU": g}, {"CPU": c, "GPU": g}) for i, (c, g) in enumerate(shapes)]


def _cfg(**sections) -> S3Config:
    return S3Config.model_validate({"data": {"validation": "v.jsonl"}, **sections})


def test_packing_is_per_node_not_a_cluster_sum():
    two_by_two = [{"GPU": 2.0}, {"GPU": 2.0}]
    assert place([{"GPU": 4.0}], [dict(f) for f in two_by_two]) == 0  # 4 GPUs free, but no node has 4
    assert place([{"GPU": 2.0}] * 5, [{"GPU": 8.0}, {"GPU": 3.0}]) == 5  # 4 + 1
    frees = [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 96.0}]
    assert place([{"CPU": 2.0, "GPU": 1.0}] * 2, frees) == 1  # only one node has a GPU
    assert frees == [{"CPU": 2.0, "GPU": 0.0}, {"CPU": 96.0}]  # consumed in place


def test_too_many_replicas_for_the_free_gpus_names_the_numbers_and_the_fix():
    nodes = _nodes((0, 0), (2, 2), (2, 2))
    with pytest.raises(CapacityError) as e:
        plan_capacity(_cfg(teacher={"replicas": 3, "tensor_parallel_size": 2}), nodes)
    msg = str(e.value)
    assert isinstance(e.value, ConfigError) and "\n" not in msg
    assert "teacher.replicas=3 replicas of 2 GPU + 2 CPU each need 6 GPU + 6 CPU, but only 2 fit" in msg
    assert "node0001: 2 CPU, 2 GPU" in msg and "lower teacher.replicas to 2" in msg


def test_a_replica_larger_than_any_node_is_an_error_naming_tp_and_pp():
    with pytest.raises(CapacityError, match=r"2 x 2 = 4 GPUs on one node; the largest node has 2 .*node0001"):
        plan_capacity(_cfg(teacher={"tensor_parallel_size": 2, "pipeline_parallel_size": 2}),
                      _nodes((8, 2), (8, 2)))
    with pytest.raises(CapacityError, match=r"lower teacher.cpus_per_replica \(now 3\) to at most 2"):
        plan_capacity(_cfg(teacher={"use_gpu": False, "cpus_per_replica": 3}), _nodes((2, 0), (2, 0)))


def test_free_not_total_resources_count():
    nodes = _nodes((4, 2), (4, 2))
    nodes[1].free = {"CPU": 4.0, "GPU": 0.0}  # another job holds this node's GPUs
    with pytest.raises(CapacityError, match=r"only 1 fit .*node0001: 4 CPU, 0 GPU"):
        plan_capacity(_cfg(teacher={"replicas": 2, "tensor_parallel_size": 2}), nodes)


def test_students_that_fit_only_without_the_teacher_release_it_unless_told_never():
    nodes = _nodes((8, 2), (8, 2))
    cfg = _cfg(teacher={"replicas": 2, "tensor_parallel_size": 2}, student={"use_gpu": True, "num_workers": 2})
    plan = plan_capacity(cfg, nodes)
    assert plan.release_for_training and plan.release_for_mining
    assert any("once the teacher is released" in line for line in plan.lines)
    small = _cfg(teacher={"replicas": 1, "tensor_parallel_size": 2}, student={"use_gpu": True, "num_workers": 2})
    plan = plan_capacity(small, nodes)
    assert not plan.release_for_training and not plan.release_for_mining  # 2 GPUs left beside the replica
    assert plan_capacity(small.model_copy(update={"teacher": small.teacher.model_copy(
        update={"release": "always"})}), nodes).release_for_training
    never = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"release": "never"})})
    with pytest.raises(CapacityError, match="do not fit beside the teacher's replicas and teacher.release=never"):
        plan_capacity(never, nodes)


def test_more_student_workers_than_free_gpus_or_cpus_is_an_error_with_the_fix():
    nodes = _nodes((0, 0), (2, 2), (2, 2))
    with pytest.raises(CapacityError, match=r"student.num_workers=5\) need 5 x 1 GPU \+ 1 CPU, but only 4 fit"
                       r".*lower student.num_workers to 4, or set student.use_gpu=false"):
        plan_capacity(_cfg(student={"use_gpu": True, "num_workers": 5}), nodes)
    cpu_only = _cfg(teacher={"use_gpu": False}, student={"num_workers": 3, "cpus_per_worker": 2})
    with pytest.raises(CapacityError, match=r"only 2 fit .*lower student.num_workers to 2, or lower "
                       r"student.cpus_per_worker \(now 2\)"):
        plan_capacity(cpu_only, nodes)


def test_an_http_teacher_holds_nothing_and_a_corpus_run_trains_nothing():
    nodes = _nodes((2, 0))
    plan = plan_capacity(_cfg(teacher={"engine": "openai", "replicas": 9}), nodes, teacher_on_ray=False)
    assert not plan.release_for_training
    plan = plan_capacity(_cfg(student={"use_gpu": True}), nodes, students=False)  # no GPU needed: no students
    assert len(plan.lines) == 1


def test_the_shipped_gpu_cluster_config_fits_its_nodes_beside_its_students():
    cfg = load_config(REPO / "configs" / "gpu_cluster.yaml")
    plan = plan_capacity(cfg, _nodes((0, 0), (96, 8), (96, 8)))  # the launcher's CPU head and 2 x 8 GPUs
    assert not plan.release_for_training and not plan.release_for_mining
    assert plan_capacity(cfg, _nodes((96, 8), (96, 6))).release_for_training  # 2 GPUs fewer: released


@pytest.mark.parametrize(
    ("frees", "workers", "gpu", "setting", "cores", "expected"),
    [
        ([96, 96], 1, False, None, None, 96),  # one worker on a two-node cluster fits on one node, not 192
        ([96, 96], 4, False, None, None, 48),  # two workers per node
        ([96, 8], 2, False, None, None, 48),  # both fit on the big node (Ray Train packs them there)
        ([96, 8], 3, False, None, None, 32),
        ([10, 10], 2, False, None, None, 10),  # a teacher holds most CPUs: sized from what is free per node
        ([4], 1, False, None, 2, 2),  # one node advertising more CPUs than its cores
        ([4], 2, False, None, 2, 1),
        ([0], 2, False, None, 2, 1),  # nothing free yet: one CPU each, Ray Train waits
        ([96, 96], 1, False, 12, None, 12),  # student.cpus_per_worker wins
        ([(96, 0), (8, 1)], 1, True, None, None, 8),  # a GPU worker is sized by the node with the GPU
    ],
)
def test_worker_cpus_are_sized_per_node(frees, workers, gpu, setting, cores, expected):
    frees = [{"CPU": float(f[0]), "GPU": float(f[1])} if isinstance(f, tuple) else {"CPU": float(f)} for f in frees]
    assert worker_cpus(frees, workers, gpu, setting, cores) == expected


def test_seed_runs_go_side_by_side_only_where_they_fit():
    cpu = _cfg(teacher={"use_gpu": False})
    # A 2-core box (Ray advertises 4 logical CPUs): judged on its real cores, the seeds run one at a time.
    assert seeds_side_by_side(cpu, _nodes((4, 0)), 3, cores=2) == (1, 0)
    # 8 real cores: a run's peak is its mining (1 teacher + 1 actor + 1 for Ray Data's tasks = 3 CPUs), so 2
    # runs fit, and each worker gets the 3 CPUs left beside its teacher (2 x (1 + 3) = 8).
    assert seeds_side_by_side(cpu, _nodes((8, 0)), 3, cores=8) == (2, 3)
    # 16 cores, 3 runs: each worker gets 4 CPUs (3 x (1 + 4) = 15).
    assert seeds_side_by_side(cpu, _nodes((16, 0)), 3, cores=16) == (3, 4)
    # GPU teacher (TP=2) and a GPU student: 3 GPUs per run at its peak; 8-GPU node holds 2 runs.
    gpu = _cfg(teacher={"tensor_parallel_size": 2}, student={"use_gpu": True, "cpus_per_worker": 4})
    assert seeds_side_by_side(gpu, _nodes((64, 8)), 3) == (2, 4)
    # Two 4-GPU nodes: a run's TP=2 replica and its student GPU pack on one node each.
    assert seeds_side_by_side(gpu, _nodes((32, 4), (32, 4)), 3)[0] == 2


def test_asking_for_more_seed_runs_than_fit_names_the_numbers_and_the_fix():
    cpu = _cfg(teacher={"use_gpu": False}, student={"cpus_per_worker": 2})
    assert seeds_side_by_side(cpu, _nodes((4, 0)), 3, asked=1) == (1, 0)
    assert seeds_side_by_side(cpu, _nodes((6, 0)), 2, asked=2, cores=2) == (2, 2)  # asked: Ray's CPUs decide
    with pytest.raises(CapacityError) as e:
        seeds_side_by_side(cpu, _nodes((6, 0)), 3, asked=3)
    msg = str(e.value)
    assert "3 CPU" in msg and "node0000: 6 CPU" in msg and "run.parallel_seeds" in msg
