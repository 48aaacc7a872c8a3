"""Several seeds of one S3 config, and their spread: mean ± std per student and per round.

Each seed is a whole run of its own in `<run.output_dir>/seed<N>` (its own manifest and teacher cache, so no
teacher answer is shared between seeds by accident), resumable like any run. The sweep report is built from
those runs' report.json files alone, so `s3ray sweep CONFIG --seeds ... --resume` after a crash rebuilds it.

Where the cluster has room for several runs side by side (`capacity.seeds_side_by_side`), each seed run is a
Ray task pinned to the driver's node (its run directory and relative paths are the driver's), whose teacher
replicas, student workers and mining actors Ray places across the cluster as a lone run's are; each run's
students then get a fixed share of CPUs so the runs do not starve each other. On a small box the seeds run
one after another in the driver, each using every core.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
from pathlib import Path

from s3ray import storage
from s3ray.capacity import seeds_side_by_side
from s3ray.config import S3Config
from s3ray.pipeline.rundir import holds_run
from s3ray.pipeline.s3 import prepare_inputs, run_s3
from s3ray.runtime import init_ray, local_cores, node_resources

log = logging.getLogger("s3ray")


class SweepFailed(RuntimeError):
    """Some seed runs failed (the others finished); names each and how to continue."""


def seed_config(cfg: S3Config, seed: int) -> S3Config:
    """The config of one seed's run: same settings, its own seed and run directory."""
    run = cfg.run.model_copy(update={"seed": seed, "output_dir": storage.join(cfg.run.output_dir, f"seed{seed}"),
                                     "name": f"{cfg.run.name} (seed {seed})"})
    return cfg.model_copy(update={"run": run})


def seed_resumes(run_dir: str, resume: bool) -> bool:
    """--resume continues the seeds that started and starts the others (a sweep stopped in seed 1 has no
    seed 2 yet); without it every seed is a new run, and one already there is refused as usual."""
    return resume and holds_run(run_dir)


def run_sweep(cfg: S3Config, seeds: list[int], resume: bool = False) -> dict:
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ValueError(f"--seeds: give distinct seeds, e.g. 0,1,2 (got {seeds})")
    configs = [seed_config(cfg, seed) for seed in seeds]
    inputs = [prepare_inputs(one) for one in configs]  # every seed's data and models, before any run starts
    at_once, cpus = _seeds_at_once(cfg, len(seeds))
    if at_once == 1:
        for one, inp in zip(configs, inputs):
            log.info("== sweep: seed %d -> %s", one.run.seed, one.run.output_dir)
            run_s3(one, resume=seed_resumes(one.run.output_dir, resume), inputs=inp)
    else:
        log.info("== sweep: %d seed runs at once, %d CPU(s) per student worker each", at_once, cpus)
        _run_side_by_side([side_by_side(one, cpus) for one in configs], inputs, resume, at_once)
    return write_sweep_report(cfg.run.output_dir, seeds)


def _seeds_at_once(cfg: S3Config, n_seeds: int) -> tuple[int, int]:
    """`capacity.seeds_side_by_side` on the cluster this process joins (or starts)."""
    asked = None if cfg.run.parallel_seeds == "auto" else cfg.run.parallel_seeds
    if n_seeds == 1 or asked == 1:
        return 1, 0
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    if not cfg.ray.check_capacity:  # an autoscaling cluster: its room is not known in advance
        return (asked or 1), (cfg.student.cpus_per_worker or 1)
    nodes = node_resources()
    return seeds_side_by_side(cfg, nodes, n_seeds, asked, cores=local_cores() if len(nodes) == 1 else None)


def side_by_side(one: S3Config, cpus: int) -> S3Config:
    """A seed run's config when others run beside it: its workers and mining get a fixed share instead of
    every free CPU, and it skips its own capacity check (a snapshot taken while the other runs hold resources
    would be wrong; the sweep checked the runs together). None of these settings change its results."""
    student = one.student.model_copy(update={"cpus_per_worker": one.student.cpus_per_worker or cpus})
    mining = one.mining.model_copy(update={"concurrency": 1 if one.mining.concurrency == "auto"
                                           else one.mining.concurrency})
    ray_cfg = one.ray.model_copy(update={"check_capacity": False})
    return one.model_copy(update={"student": student, "mining": mining, "ray": ray_cfg})


def _run_side_by_side(configs: list[S3Config], inputs: list, resume: bool, at_once: int) -> None:
    """At most `at_once` seed runs in flight as Ray tasks; a failed seed does not stop the others."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    task = ray.remote(num_cpus=0, max_retries=0, scheduling_strategy=here)(_seed_task)
    pending = list(zip(configs, inputs))
    running: dict = {}
    failed: list[str] = []
    while pending or running:
        while pending and len(running) < at_once:
            one, inp = pending.pop(0)
            log.info("== sweep: seed %d -> %s (Ray task)", one.run.seed, one.run.output_dir)
            ref = task.options(runtime_env={"env_vars": _teacher_secrets(one)}).remote(
                one, seed_resumes(one.run.output_dir, resume), inp, os.getcwd())
            running[ref] = one.run.seed
        done, _ = ray.wait(list(running), num_returns=1)
        seed = running.pop(done[0])
        try:
            ray.get(done[0])
            log.info("== sweep: seed %d finished", seed)
        except Exception as e:  # noqa: BLE001 - reported below, after the other seeds finish
            log.error("== sweep: seed %d failed: %s", seed, e)
            failed.append(f"seed {seed}: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}")
    if failed:
        raise SweepFailed("sweep: " + "; ".join(failed) + ". Fix the cause and continue with --resume "
                           "(finished seeds and steps are kept)")


def _teacher_secrets(cfg: S3Config) -> dict[str, str]:
    """The driver's API key for an HTTP teacher: a task on a cluster the driver joined runs in a worker
    that `ray start` launched, without the driver's environment."""
    name = cfg.teacher.openai.api_key_env
    return {name: os.environ[name]} if cfg.teacher.engine == "openai" and name in os.environ else {}


def _seed_task(cfg: S3Config, resume: bool, inputs, cwd: str) -> None:
    """One seed run inside a Ray task on the driver's node, from the driver's working directory (the
    config's relative paths are the driver's), logging to the seed's run.log as a lone run does. `cfg`
    travels as the object, not its JSON dump, which drops credentials from URLs."""
    os.chdir(cwd)
    if not storage.is_local(cfg.run.output_dir):  # an object store run logs to the driver only
        run_s3(cfg, resume=resume, inputs=inputs)
        return
    Path(cfg.run.output_dir).mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(Path(cfg.run.output_dir) / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(min(root.level or logging.INFO, logging.INFO))
    try:
        run_s3(cfg, resume=resume, inputs=inputs)
    finally:
        root.removeHandler(handler)
        handler.close()


def spread(values: list[float | None]) -> dict:
    """Mean, sample std and count of the values present (None = a seed without that figure)."""
    xs = [v for v in values if v is not None]
    if not xs:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def aggregate(reports: dict[int, dict]) -> dict:
    """Mean and sample std over seeds of every student's test/validation score and every round's numbers."""
    first = next(iter(reports.values()))
    methods = [c["method"] for c in first["comparison"]]
    students = []
    for m in methods:
        rows = [next((c for c in r["comparison"] if c["method"] == m), {}) for r in reports.values()]
        students.append({"method": m, **{k: spread([row.get(k) for row in rows])
                                         for k in ("val", "test", "test_secondary", "train_rows")}})
    rounds = []
    for i in range(len(first["rounds"])):
        rows = [r["rounds"][i] for r in reports.values() if i < len(r["rounds"])]
        rounds.append({"round": i, **{k: spread([row.get(k) for row in rows])
                                      for k in ("val", "test", "total_rows", "errors_mined", "teacher_tokens")}})
    return {"run": first["run"].split(" (seed")[0], "task": first["task"], "metric": first["metric"],
            "secondary_metric": first.get("secondary_metric"), "seeds": list(reports), "students": students,
            "rounds": rounds, "complete": all(r.get("complete") for r in reports.values()),
            "per_seed": reports}


def spread_text(s: dict, seeds: int, pct: bool = True) -> str:
    """Mean ± std; a figure from fewer of the `seeds` runs says how many, and a lone seed's has no spread."""
    if s.get("mean") is None:
        return "–"
    mean = f"{100 * s['mean']:.2f}" if pct else f"{s['mean']:,.0f}"
    n = s.get("n", seeds)
    if n < seeds:
        return f"{mean} ({n} of {seeds} seeds)"
    if n == 1:
        return mean
    return f"{mean} ± {100 * s['std']:.2f}" if pct else f"{mean} ± {s['std']:,.0f}"


def _markdown(agg: dict) -> str:
    m, m2, n = agg["metric"], agg.get("secondary_metric"), len(agg["seeds"])
    lines = [f"# s3ray sweep: {agg['run']}", "",
             f"Task **{agg['task']}** · seeds {', '.join(map(str, agg['seeds']))} · mean ± sample std over seeds"
             + ("" if agg["complete"] else " · **some runs incomplete**"), "",
             "## Students", "", f"| method | train rows | validation {m} | test {m} |" + (f" test {m2} |" if m2 else ""),
             "|---|---:|---:|---:|" + ("---:|" if m2 else "")]
    for s in agg["students"]:
        lines.append(f"| {s['method']} | {spread_text(s['train_rows'], n, False)} | {spread_text(s['val'], n)} | "
                     f"{spread_text(s['test'], n)} |" + (f" {spread_text(s['test_secondary'], n)} |" if m2 else ""))
    lines += ["", "## Rounds", "", (f"| round | synthetic rows | validation {m} | test {m} | errors mined | "
              "teacher tokens |"), "|---:|---:|---:|---:|---:|---:|"]
    for r in agg["rounds"]:
        lines.append(f"| {r['round']} | {spread_text(r['total_rows'], n, False)} | {spread_text(r['val'], n)} | "
                     f"{spread_text(r['test'], n)} | {spread_text(r['errors_mined'], n, False)} | "
                     f"{spread_text(r['teacher_tokens'], n, False)} |")
    lines += ["", "## Per seed (test)", "", "| seed | " + " | ".join(s["method"] for s in agg["students"]) + " |",
              "|---:|" + "---:|" * len(agg["students"])]
    for seed, rep in agg["per_seed"].items():
        by = {c["method"]: c.get("test") for c in rep["comparison"]}
        cells = ["–" if by.get(s["method"]) is None else f"{100 * by[s['method']]:.2f}" for s in agg["students"]]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    lines += ["", "Each seed's own report: `seed<N>/report.md`.", ""]
    return "\n".join(lines)


def finished_seeds(sweep_dir: str | Path) -> list[int]:
    """The seeds under `sweep_dir` that have a report.json (seed<N>/report.json), in order."""
    found = set()
    for rel in storage.list_dir(str(sweep_dir), recursive=True):
        parts = rel.split("/")
        if len(parts) == 2 and parts[1] == "report.json" and parts[0].startswith("seed") and parts[0][4:].isdigit():
            found.add(int(parts[0][4:]))
    return sorted(found)


def write_sweep_report(sweep_dir: str | Path, seeds: list[int]) -> dict:
    """sweep_report.json/.md in `sweep_dir` (a path or object store URI) from its seed runs' report.json."""
    reports = {}
    for seed in seeds:
        path = storage.join(str(sweep_dir), f"seed{seed}", "report.json")
        if not storage.exists(path):
            raise FileNotFoundError(f"{path} is missing: run that seed first (s3ray sweep ... --resume)")
        reports[seed] = json.loads(storage.read_bytes(path))
    agg = aggregate(reports)
    storage.write_bytes(storage.join(str(sweep_dir), "sweep_report.json"), json.dumps(agg, indent=2).encode())
    storage.write_bytes(storage.join(str(sweep_dir), "sweep_report.md"), _markdown(agg).encode())
    return agg
