"""Will a run fit its Ray cluster? Per-node arithmetic over Ray resource dicts; imports no Ray.

Every unit the run places lives on ONE node: a teacher replica (its TP x PP GPU bundles are STRICT_PACKed),
a student training worker, a mining actor. `place` packs units into the nodes' FREE resources one node at a
time, so "4 GPUs free" on two 2-GPU nodes is never mistaken for room for one 4-GPU replica, and a cluster
total is never divided among workers. `plan_capacity` runs at start, before any generation: a run that
cannot fit fails with one line naming the numbers and the setting to change, and the plan says whether the
teacher must release its replicas while students train and mining runs (`teacher.release`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from s3ray.config import ConfigError, S3Config, TeacherConfig

log = logging.getLogger("s3ray")
Unit = dict[str, float]
_EPS = 1e-9


class CapacityError(ConfigError):
    """The run needs more than the cluster has free (or than any node has)."""


@dataclass
class Node:
    """One live Ray node: its total resources and what is free now."""

    node_id: str
    total: Unit
    free: Unit = field(default_factory=dict)


@dataclass
class CapacityPlan:
    release_for_training: bool = False  # students do not fit beside the teacher's replicas
    release_for_mining: bool = False
    lines: list[str] = field(default_factory=list)  # what was checked, for logs and `s3ray validate`


# ------------------------------------------------------------------------------------------ packing


def fits(unit: Unit, free: Unit) -> bool:
    return all(free.get(k, 0.0) + _EPS >= v for k, v in unit.items() if v > 0)


def place(units: list[Unit], frees: list[Unit]) -> int:
    """How many of `units` fit, each on one node, packed largest first into the node that fits it most
    tightly (best fit). `frees` (one dict per node) is consumed."""
    placed = 0
    for unit in sorted(units, key=lambda u: (u.get("GPU", 0.0), u.get("CPU", 0.0)), reverse=True):
        room = [f for f in frees if fits(unit, f)]
        if not room:
            continue
        best = min(room, key=lambda f: (f.get("GPU", 0.0), f.get("CPU", 0.0)))
        for k, v in unit.items():
            best[k] = best.get(k, 0.0) - v
        placed += 1
    return placed


def merged(bundles: list[Unit]) -> Unit:
    out: Unit = {}
    for b in bundles:
        for k, v in b.items():
            out[k] = out.get(k, 0.0) + v
    return out


def shape(unit: Unit) -> str:
    """`{"GPU": 2, "CPU": 2}` as "2 GPU + 2 CPU"."""
    keys = [k for k in ("GPU", "CPU") if unit.get(k)] + sorted(k for k in unit if k not in ("GPU", "CPU") and unit[k])
    return " + ".join(f"{unit[k]:g} {k}" for k in keys) or "nothing"


def describe_nodes(nodes: list[Node], free: bool = True) -> str:
    """Each node's free (or total) CPUs and GPUs, by the start of its id: "3f2a91c0: 2 CPU, 2 GPU; ..."."""
    parts = []
    for n in nodes:
        res = n.free if free else n.total
        parts.append(f"{n.node_id[:8]}: {res.get('CPU', 0.0):g} CPU, {res.get('GPU', 0.0):g} GPU")
    return "; ".join(parts) or "no live nodes"


# ------------------------------------------------------------------------------------- unit shapes


def teacher_uses_gpu(cfg: TeacherConfig, nodes: list[Node]) -> bool:
    """`teacher.use_gpu`, or (None) whether the cluster has GPUs, as the replica pool decides."""
    if cfg.use_gpu is not None:
        return cfg.use_gpu
    return any(n.total.get("GPU", 0.0) > 0 for n in nodes)


def replica_bundles(cfg: TeacherConfig, use_gpu: bool) -> list[Unit]:
    """The placement-group bundles of one teacher replica (the pool creates exactly these). On GPUs with
    TP x PP > 1 one bundle per GPU (vLLM's Ray executor puts one worker on each), STRICT_PACKed."""
    world = cfg.tensor_parallel_size * cfg.pipeline_parallel_size
    if use_gpu and world > 1:
        bundles = [{"GPU": 1.0, "CPU": 1.0} for _ in range(world)]
    elif use_gpu:
        bundles = [{"CPU": float(cfg.cpus_per_replica), "GPU": 1.0}]
    else:
        bundles = [{"CPU": float(cfg.cpus_per_replica)}]
    # teacher.resources (custom node labels) go in bundle 0: STRICT_PACK keeps the others on the same node.
    bundles[0].update({k: float(v) for k, v in cfg.resources.items()})
    return bundles


def replica_too_big(cfg: TeacherConfig, use_gpu: bool, nodes: list[Node]) -> str | None:
    """Why one replica can never be placed (it is larger than every node), or None."""
    unit = merged(replica_bundles(cfg, use_gpu))
    if any(fits(unit, n.total) for n in nodes):
        return None
    if use_gpu:
        largest = max((n.total.get("GPU", 0.0) for n in nodes), default=0.0)
        tp, pp = cfg.tensor_parallel_size, cfg.pipeline_parallel_size
        if unit["GPU"] > largest:
            return (f"a teacher replica needs teacher.tensor_parallel_size x teacher.pipeline_parallel_size = "
                    f"{tp} x {pp} = {tp * pp:g} GPUs on one node; the largest node has {largest:g} (a replica's "
                    "GPUs are packed on one node): lower tensor_parallel_size or pipeline_parallel_size, or use "
                    "nodes with more GPUs")
    largest = max((n.total.get("CPU", 0.0) for n in nodes), default=0.0)
    return (f"a teacher replica needs {shape(unit)} on one node; the largest node has {largest:g} CPUs: lower "
            f"teacher.cpus_per_replica (now {cfg.cpus_per_replica:g}) to at most {largest:g}")


def worker_unit(cpus: float, use_gpu: bool) -> Unit:
    return {"CPU": float(cpus), "GPU": 1.0} if use_gpu else {"CPU": float(cpus)}


def mining_unit(use_gpu: bool) -> Unit:
    """The smallest mining pool: one inference actor (one GPU, or one CPU)."""
    return {"GPU": 1.0} if use_gpu else {"CPU": 1.0}


def worker_cpus(frees: list[Unit], num_workers: int, use_gpu: bool = False, setting: int | None = None,
                cores: int | None = None) -> int:
    """CPUs (= torch threads) for each of `num_workers` student workers: `setting` (student.cpus_per_worker)
    wins; else the most CPUs per worker with which every worker fits, each on one node, in the nodes' free
    resources `frees` (a node without a free GPU hosts no GPU worker); never more than `cores` (a one-node
    cluster's real cores) split among the workers; at least 1 (Ray Train then waits for room)."""
    if setting:
        return int(setting)
    share = 1
    for cpus in range(int(max((f.get("CPU", 0.0) for f in frees), default=0.0)), 0, -1):
        if place([worker_unit(cpus, use_gpu)] * num_workers, [dict(f) for f in frees]) == num_workers:
            share = cpus
            break
    if cores is not None:
        share = min(share, cores // num_workers)
    return max(1, share)


# ------------------------------------------------------------------------------------------ the plan


def _copies(frees: list[Unit]) -> list[Unit]:
    return [dict(f) for f in frees]


def _teacher_frees(cfg: S3Config, nodes: list[Node], plan: CapacityPlan) -> list[Unit]:
    """Free resources left once the teacher's replicas are placed; raises when they do not fit."""
    t = cfg.teacher
    use_gpu = teacher_uses_gpu(t, nodes)
    too_big = replica_too_big(t, use_gpu, nodes)
    if too_big:
        raise CapacityError(f"capacity: {too_big} (nodes: {describe_nodes(nodes, free=False)})")
    unit = merged(replica_bundles(t, use_gpu))
    frees = _copies([n.free for n in nodes])
    n = place([unit] * t.replicas, frees)
    if n < t.replicas:
        fix = f"lower teacher.replicas to {n}" if n else "free those resources (other jobs hold them)"
        raise CapacityError(
            f"capacity: teacher.replicas={t.replicas} replicas of {shape(unit)} each need "
            f"{shape(merged([unit] * t.replicas))}, but only {n} fit in the cluster's free resources (free per "
            f"node: {describe_nodes(nodes)}): {fix}, or set ray.check_capacity=false on an autoscaling cluster")
    plan.lines.append(f"teacher: {t.replicas} x {shape(unit)} fit ({'GPU' if use_gpu else 'CPU'} replicas)")
    return frees


def _release_needed(what: str, units: list[Unit], fix: Callable[[int], str], cfg: S3Config, nodes: list[Node],
                    after_teacher: list[Unit] | None, plan: CapacityPlan) -> bool:
    """Whether `units` fit only once the teacher releases its replicas; raises when they do not fit even
    then. `fix(n)`: what to change when only n fit. `after_teacher`: None when no replicas run on Ray."""
    alone = place(units, _copies([n.free for n in nodes]))
    if alone < len(units):
        raise CapacityError(
            f"capacity: {what} need {len(units)} x {shape(units[0])}, but only {alone} fit in the cluster's free "
            f"resources (free per node: {describe_nodes(nodes)}): {fix(alone)}")
    beside = after_teacher is None or place(units, _copies(after_teacher)) == len(units)
    if not beside and cfg.teacher.release == "never":
        raise CapacityError(
            f"capacity: {what} ({len(units)} x {shape(units[0])}) do not fit beside the teacher's replicas and "
            f"teacher.release=never keeps them up (free per node: {describe_nodes(nodes)}): set "
            "teacher.release=auto, or lower teacher.replicas")
    release = after_teacher is not None and (cfg.teacher.release == "always" or not beside)
    plan.lines.append(f"{what}: {len(units)} x {shape(units[0])} fit "
                      + ("once the teacher is released" if release else "beside the teacher"))
    return release


def plan_capacity(cfg: S3Config, nodes: list[Node], teacher_on_ray: bool = True, students: bool = True
                  ) -> CapacityPlan:
    """Check that the run fits the nodes' free resources (raises CapacityError naming the numbers and the
    fix) and decide when the teacher must release its replicas. `teacher_on_ray`: the teacher runs as Ray
    replicas (not an HTTP endpoint); `students`: the run also trains students and mines errors."""
    plan = CapacityPlan()
    after = _teacher_frees(cfg, nodes, plan) if teacher_on_ray else None
    if not students:
        return plan
    s = cfg.student
    workers = 1 if s.kind == "embedding_head" else s.num_workers  # embedding_head: one Ray task
    what = "student (embedding_head task)" if workers == 1 and s.kind == "embedding_head" else \
        f"student (student.num_workers={s.num_workers})"
    gpu_fix = ", or set student.use_gpu=false" if s.use_gpu else ""
    cpu_fix = f", or lower student.cpus_per_worker (now {s.cpus_per_worker})" if s.cpus_per_worker else ""

    def fix(n: int) -> str:
        first = f"lower student.num_workers to {n}" if 0 < n < workers else "free those resources"
        return first + cpu_fix + gpu_fix

    cpus = s.cpus_per_worker or 1  # sized up from the free CPUs at training time (worker_cpus)
    plan.release_for_training = _release_needed(what, [worker_unit(cpus, s.use_gpu)] * workers, fix, cfg, nodes,
                                                after, plan)
    plan.release_for_mining = _release_needed("mining (one inference actor)", [mining_unit(s.use_gpu)],
                                              lambda n: "free those resources" + gpu_fix, cfg, nodes, after, plan)
    return plan


def check_capacity(cfg: S3Config, students: bool = True, backend: str | None = None) -> CapacityPlan:
    """`plan_capacity` on the Ray cluster this process has joined (the Ray edge of this module); skipped
    when `ray.check_capacity` is off."""
    if not cfg.ray.check_capacity:
        return CapacityPlan(lines=["not checked (ray.check_capacity=false)"])
    from s3ray.runtime import node_resources  # imports Ray

    teacher_on_ray = cfg.teacher.engine != "openai" and backend in (None, "ray")
    plan = plan_capacity(cfg, node_resources(), teacher_on_ray=teacher_on_ray, students=students)
    log.info("capacity: %s", "; ".join(plan.lines))
    return plan


# --------------------------------------------------------------------------------- seeds side by side


def seed_run_units(cfg: S3Config, use_gpu: bool, worker_cpus_each: int) -> tuple[list[Unit], list[Unit]]:
    """One seed run's two peaks: its teacher replicas while its students train, and its teacher replicas while
    it mines errors with one inference actor and a CPU for Ray Data's read and write tasks (a run never trains
    and mines at once; without that CPU, runs whose actors hold every CPU would wait on each other forever)."""
    teacher = [merged(replica_bundles(cfg.teacher, use_gpu))] * cfg.teacher.replicas
    workers = 1 if cfg.student.kind == "embedding_head" else cfg.student.num_workers
    return (teacher + [worker_unit(worker_cpus_each, cfg.student.use_gpu)] * workers,
            teacher + [mining_unit(cfg.student.use_gpu), {"CPU": 1.0}])


def copies_fit(cfg: S3Config, nodes: list[Node], copies: int, worker_cpus_each: int, cores: int | None) -> bool:
    """Whether `copies` seed runs fit the nodes' free resources side by side, at both of a run's peaks.
    `cores`: a one-node cluster's real cores, which cap its (possibly oversubscribed) CPUs."""
    frees = _copies([n.free for n in nodes])
    if cores is not None and len(frees) == 1:
        frees[0]["CPU"] = min(frees[0].get("CPU", 0.0), float(cores))
    use_gpu = teacher_uses_gpu(cfg.teacher, nodes)
    for peak in seed_run_units(cfg, use_gpu, worker_cpus_each):
        units = peak * copies
        if place(units, _copies(frees)) < len(units):
            return False
    return True


def seeds_side_by_side(cfg: S3Config, nodes: list[Node], n_seeds: int, asked: int | None = None,
                       cores: int | None = None) -> tuple[int, int]:
    """How many seed runs of `cfg` to run at once, and the CPUs per student worker each then gets.

    `asked` None ("auto"): as many as fit the free resources (at least 1, at most `n_seeds`), judged on the
    real `cores` of a one-node cluster, so a small box runs its seeds one after another. `asked` N: N at once,
    or CapacityError naming the numbers when they do not fit. Each run's workers get the most CPUs (up to
    `student.cpus_per_worker` when set) with which all the runs still fit.
    """
    setting = cfg.student.cpus_per_worker
    cap = cores if asked is None else None  # asked for N: Ray's own accounting decides
    if asked is None:
        k = max([c for c in range(1, n_seeds + 1) if copies_fit(cfg, nodes, c, setting or 1, cap)], default=1)
    else:
        k = min(asked, n_seeds)
        if k > 1 and not copies_fit(cfg, nodes, k, setting or 1, cap):
            one = seed_run_units(cfg, teacher_uses_gpu(cfg.teacher, nodes), setting or 1)[0]
            raise CapacityError(
                f"capacity: {k} seed runs side by side each need {shape(merged(one))} at their peak, but the "
                f"cluster's free resources do not hold {k} of them (free per node: {describe_nodes(nodes)}): "
                "run fewer seeds at once (--parallel / run.parallel_seeds), or leave it at auto")
    if k == 1:
        return 1, 0  # 0: the run sizes its workers itself, as a run on its own does
    cpus = setting or 1
    while not setting and cpus < 256 and copies_fit(cfg, nodes, k, cpus + 1, cap):
        cpus += 1
    return k, cpus
