"""Several seeds of one S3 config, and their spread: mean ± std per student and per round.

Each seed is a whole run of its own in `<run.output_dir>/seed<N>` (its own manifest and teacher cache, so no
teacher answer is shared between seeds by accident), resumable like any run. The sweep report is built from
those runs' report.json files alone, so `s3ray sweep CONFIG --seeds ... --resume` after a crash rebuilds it.
Seeds run one after another: on a small machine each run already uses every core.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

from s3ray.config import S3Config
from s3ray.pipeline.rundir import holds_run
from s3ray.pipeline.s3 import prepare_inputs, run_s3

log = logging.getLogger("s3ray")


def seed_config(cfg: S3Config, seed: int) -> S3Config:
    """The config of one seed's run: same settings, its own seed and run directory."""
    run = cfg.run.model_copy(update={"seed": seed, "output_dir": str(Path(cfg.run.output_dir) / f"seed{seed}"),
                                     "name": f"{cfg.run.name} (seed {seed})"})
    return cfg.model_copy(update={"run": run})


def seed_resumes(run_dir: str, resume: bool) -> bool:
    """--resume continues the seeds that started and starts the others (a sweep stopped in seed 1 has no
    seed 2 yet); without it every seed is a new run, and one already there is refused as usual."""
    return resume and holds_run(run_dir)


def run_sweep(cfg: S3Config, seeds: list[int], resume: bool = False) -> dict:
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ValueError(f"--seeds: give distinct seeds, e.g. 0,1,2 (got {seeds})")
    for seed in seeds:
        one = seed_config(cfg, seed)
        run_dir = Path(one.run.output_dir)
        log.info("== sweep: seed %d -> %s", seed, run_dir)
        run_s3(one, resume=seed_resumes(one.run.output_dir, resume), inputs=prepare_inputs(one))
    return write_sweep_report(Path(cfg.run.output_dir), seeds)


def _spread(values: list[float | None]) -> dict:
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
        students.append({"method": m, **{k: _spread([row.get(k) for row in rows])
                                         for k in ("val", "test", "test_secondary", "train_rows")}})
    rounds = []
    for i in range(len(first["rounds"])):
        rows = [r["rounds"][i] for r in reports.values() if i < len(r["rounds"])]
        rounds.append({"round": i, **{k: _spread([row.get(k) for row in rows])
                                      for k in ("val", "test", "total_rows", "errors_mined", "teacher_tokens")}})
    return {"run": first["run"].split(" (seed")[0], "task": first["task"], "metric": first["metric"],
            "secondary_metric": first.get("secondary_metric"), "seeds": list(reports), "students": students,
            "rounds": rounds, "complete": all(r.get("complete") for r in reports.values()),
            "per_seed": reports}


def _pm(s: dict, pct: bool = True) -> str:
    if s["mean"] is None:
        return "–"
    if pct:
        return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"
    return f"{s['mean']:,.0f} ± {s['std']:,.0f}"


def _markdown(agg: dict) -> str:
    m = agg["metric"]
    lines = [f"# s3ray sweep: {agg['run']}", "",
             f"Task **{agg['task']}** · seeds {', '.join(map(str, agg['seeds']))} · mean ± sample std over seeds"
             + ("" if agg["complete"] else " · **some runs incomplete**"), "",
             "## Students", "", f"| method | train rows | validation {m} | test {m} |", "|---|---:|---:|---:|"]
    for s in agg["students"]:
        lines.append(f"| {s['method']} | {_pm(s['train_rows'], False)} | {_pm(s['val'])} | {_pm(s['test'])} |")
    lines += ["", "## Rounds", "", (f"| round | synthetic rows | validation {m} | test {m} | errors mined | "
              "teacher tokens |"), "|---:|---:|---:|---:|---:|---:|"]
    for r in agg["rounds"]:
        lines.append(f"| {r['round']} | {_pm(r['total_rows'], False)} | {_pm(r['val'])} | {_pm(r['test'])} | "
                     f"{_pm(r['errors_mined'], False)} | {_pm(r['teacher_tokens'], False)} |")
    lines += ["", "## Per seed (test)", "", "| seed | " + " | ".join(s["method"] for s in agg["students"]) + " |",
              "|---:|" + "---:|" * len(agg["students"])]
    for seed, rep in agg["per_seed"].items():
        by = {c["method"]: c.get("test") for c in rep["comparison"]}
        cells = ["–" if by.get(s["method"]) is None else f"{100 * by[s['method']]:.2f}" for s in agg["students"]]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    lines += ["", "Each seed's own report: `seed<N>/report.md`.", ""]
    return "\n".join(lines)


def write_sweep_report(sweep_dir: Path, seeds: list[int]) -> dict:
    reports = {}
    for seed in seeds:
        path = sweep_dir / f"seed{seed}" / "report.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run that seed first (s3ray sweep ... --resume)")
        reports[seed] = json.loads(path.read_text())
    agg = aggregate(reports)
    (sweep_dir / "sweep_report.json").write_text(json.dumps(agg, indent=2))
    (sweep_dir / "sweep_report.md").write_text(_markdown(agg))
    return agg
