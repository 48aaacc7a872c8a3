"""The EES ablation: plain vs class-balanced error extrapolation, with and without the fair student budget,
3 seeds each, on SST-2, RTE and QNLI; writes docs/ablation.md (and .json).

    .venv/bin/python scripts/ablation.py                       # every task and variant (many CPU hours)
    .venv/bin/python scripts/ablation.py --tasks sst2 --seeds 0,1,2 --variants plain,balanced

Each (task, variant) is an `s3ray sweep` in runs/ablation/<task>/<variant>, resumable: rerunning the script
continues unfinished runs and only rebuilds the table for finished ones; `--table-only` runs nothing and
tabulates the seed runs finished so far. Every finished seed run's report (a few KB) is recorded in the .json
twin of the table, which is under version control: the table is rebuilt from that record plus any newer runs,
so seeds run on different machines or days add up, and losing a run directory loses nothing. A cell recorded
before per-seed reports were kept (aggregates only) stays as recorded until reruns of all its seeds are in;
the reruns finished so far are recorded beside it, so they too may run one seed per call.

Round 0 (rationales and seed synthesis) is the same request set in every variant of a seed, so a variant's
seed runs start from a copy of the first finished variant's teacher cache: identical requests, identical
answers, no tokens spent twice.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from s3ray.pipeline.sweep import aggregate, spread_text, write_sweep_report

REPO = Path(__file__).resolve().parents[1]
TASKS = {"sst2": "configs/sst2_quickstart.yaml", "rte": "configs/rte.yaml", "qnli": "configs/qnli.yaml"}
# Fair budget: every student gets as many optimizer steps as the final S3 student of the task's config.
MIN_STEPS = {"sst2": 90, "rte": 60, "qnli": 120}
VARIANTS = {
    "plain": {"synthesis.ees_balance": "none"},
    "balanced": {"synthesis.ees_balance": "per_label"},
    "plain_fair": {"synthesis.ees_balance": "none", "student.min_steps": "{min_steps}"},
    "balanced_fair": {"synthesis.ees_balance": "per_label", "student.min_steps": "{min_steps}"},
}


# How the table's cells come about, for the doc: they add up over many calls, so no one command line made it.
LOOP_ONLY = "--set baselines.equal_budget=false --set baselines.real_validation=false --set baselines.s3_plus_real=false"
HOW_RUN = (
    "How the cells were run: `python scripts/ablation.py --tasks T --variants V --seeds S`, any subset per call "
    "(resumable; `--table-only` rebuilds this table from the finished runs); each sweep's own report: "
    "`runs/ablation/<task>/<variant>/sweep_report.md`. The loop-only cells ran with `" + LOOP_ONLY + "`; a '–' "
    "in a students table is a baseline switched off that way. The baseline students come from full runs "
    "without those `--set`s (resumed finished runs, or one seed per call). Every seed run's report is recorded "
    "in `ablation.json`, from which the table is rebuilt when those run directories are gone.\n"
)

def copy_cache(src: Path, dest: Path) -> None:
    """A consistent copy of a teacher cache, even one a running sibling is writing (SQLite's backup API
    includes what is still in its write-ahead log; a file copy would not)."""
    with sqlite3.connect(f"file:{src}?mode=ro", uri=True) as source, sqlite3.connect(dest) as target:
        source.backup(target)


def run_variant(task: str, variant: str, seeds: list[int], out: Path, extra: tuple[str, ...] = ()) -> Path:
    sweep_dir = out / task / variant
    for seed in seeds:  # reuse round 0's teacher answers from a sibling variant of the same seed
        cache = sweep_dir / f"seed{seed}" / "teacher_cache.sqlite"
        donors = [p for p in (out / task).glob(f"*/seed{seed}/teacher_cache.sqlite") if p != cache]
        if not cache.exists() and donors:
            cache.parent.mkdir(parents=True, exist_ok=True)
            copy_cache(donors[0], cache)
    sets = [f"run.output_dir={sweep_dir}"] + [
        f"{k}={v.format(min_steps=MIN_STEPS[task])}" for k, v in VARIANTS[variant].items()] + list(extra)
    cmd = [sys.executable, "-m", "s3ray.cli", "sweep", TASKS[task], "--seeds", ",".join(map(str, seeds)),
           "--resume"] + [a for s in sets for a in ("--set", s)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    return sweep_dir / "sweep_report.json"


def tokens_to_reach(rounds: list[dict], target: float | None) -> float | None:
    """Cumulative mean teacher tokens up to the first round whose mean test score reaches `target`."""
    spent = 0.0
    for r in rounds:
        spent += r["teacher_tokens"]["mean"] or 0.0
        if target is not None and r["test"]["mean"] is not None and r["test"]["mean"] >= target:
            return spent
    return None


def val_falls(per_seed: dict) -> tuple[int, int]:
    """Rounds (over seeds) whose validation score fell below the round before, and rounds compared."""
    fell = total = 0
    for rep in per_seed.values():
        vals = [r.get("val") for r in rep["rounds"]]
        for before, after in itertools.pairwise(vals):
            if before is not None and after is not None:
                total += 1
                fell += after < before
    return fell, total


def majority_shares(report: dict) -> list[float]:
    """Per EES round (1..) of one seed run, the largest label's share of the round's new rows."""
    counts = [r.get("new_by_label") or {} for r in report["rounds"][1:]]
    return [max(c.values()) / sum(c.values()) for c in counts if sum(c.values())]


# What a seed run's report.json keeps in the record: enough to re-aggregate, without per-step generation logs.
RECORD_KEYS = ("run", "task", "metric", "secondary_metric", "comparison", "rounds", "complete", "total_seconds")


def trim(reports: dict[int, dict]) -> dict[int, dict]:
    """Seed runs' reports cut to what re-aggregates them (the per-step generation logs go)."""
    return {seed: {k: rep[k] for k in RECORD_KEYS if k in rep} for seed, rep in sorted(reports.items())}


def cell(reports: dict[int, dict]) -> dict:
    """One (task, variant) of the table from its seed runs' reports: spread over seeds plus the ablation's columns."""
    reports = trim(reports)
    agg = aggregate(reports)
    shares = [x for rep in reports.values() for x in majority_shares(rep)]
    agg["ees_majority_share"] = sum(shares) / len(shares) if shares else None
    return agg


def read_record(path: Path) -> dict[str, dict[str, dict]]:
    """The committed record (the table's .json twin); seed keys back to ints after the JSON round trip."""
    if not path.exists():
        return {}
    record = json.loads(path.read_text())
    for variants in record.values():
        for agg in variants.values():
            for key in ("per_seed", "reruns"):
                if key in agg:
                    agg[key] = {int(k): v for k, v in agg[key].items()}
    return record


def table(results: dict[str, dict[str, dict]]) -> str:
    lines = ["# EES ablation: plain vs class-balanced, with and without a fair student budget", "",
             ("Test accuracy (mean ± sample std over seeds) of the S3 student after each round, and the teacher "
             "tokens (rationales + seed + EES, mean over seeds) spent until a round first reached the plain "
             "variant's final accuracy. *val fell*: rounds, over all seeds, whose validation accuracy fell below "
             "the round before. *EES majority share*: the largest label's share of an EES round's new rows "
             "(mean over rounds and seeds; 50% is balanced on two labels). Written by `scripts/ablation.py`."), ""]
    for task, variants in results.items():
        plain_final = variants.get("plain", {}).get("rounds", [{}])[-1].get("test", {}).get("mean")
        n_rounds = max(len(v["rounds"]) for v in variants.values())
        lines += [f"## {task}", "", "| variant | seeds | " + " | ".join(f"round {i}" for i in range(n_rounds))
                  + " | tokens to reach plain's final | val fell | EES majority share |",
                  "|---|---|" + "---:|" * (n_rounds + 3)]
        for name, agg in variants.items():
            cells = [spread_text(r["test"], len(agg.get("seeds", []))) for r in agg["rounds"]]
            reach = tokens_to_reach(agg["rounds"], plain_final)
            # A cell recorded before per-seed reports were kept carries these counts (and its minutes) instead.
            fell, total = val_falls(agg["per_seed"]) if "per_seed" in agg else agg.get("val_fell") or (0, 0)
            share = agg.get("ees_majority_share")
            used = ", ".join(map(str, agg.get("seeds", []))) or "–"
            if agg.get("reruns"):  # an aggregates-only cell whose seeds are being rerun
                used += " (rerun so far: " + ", ".join(map(str, agg["reruns"])) + ")"
            lines.append(f"| {name} | {used} | " + " | ".join(cells) + f" | {'–' if plain_final is None else 'not reached' if reach is None else f'{reach:,.0f}'}"
                         + (f" | {fell} of {total}" if total else " | –")
                         + (f" | {100 * share:.0f}% |" if share is not None else " | – |"))
        students = [s["method"] for s in next(iter(variants.values())).get("students", [])]
        if students:
            lines += ["", f"Every student of the {task} runs, test accuracy (mean ± std over seeds):", "",
                      "| variant | " + " | ".join(students) + " | minutes per seed run |",
                      "|---|" + "---:|" * (len(students) + 1)]
            for name, agg in variants.items():
                by = {s["method"]: s["test"] for s in agg.get("students", [])}
                minutes = [(rep.get("total_seconds") or 0) / 60 for rep in agg.get("per_seed", {}).values()]
                minutes = sum(minutes) / len(minutes) if minutes else agg.get("minutes_per_seed")
                seeds = len(agg.get("seeds", []))
                lines.append(f"| {name} | " + " | ".join(spread_text(by.get(m, {}), seeds) for m in students)
                             + (f" | {minutes:.0f} |" if minutes else " | – |"))
        lines.append("")
    return "\n".join(lines)


def finished_seeds(sweep_dir: Path, seeds: list[int]) -> list[int]:
    """The seeds whose run in `sweep_dir` finished (its report.json says complete)."""
    done = []
    for seed in seeds:
        report = sweep_dir / f"seed{seed}" / "report.json"
        if report.exists() and json.loads(report.read_text()).get("complete"):
            done.append(seed)
    return done


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated, from: " + ", ".join(TASKS))
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="runs/ablation", help="where the sweeps' run directories go")
    p.add_argument("--doc", default="docs/ablation.md", help="the table (a .json twin is written beside it)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="passed to every sweep, e.g. baselines.equal_budget=false to measure the loop alone")
    p.add_argument("--table-only", action="store_true",
                   help="run nothing: tabulate the seed runs that have finished (a variant with fewer seeds "
                   "says how many)")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    out = (REPO / args.out).resolve()
    doc = REPO / args.doc
    cells = [(task, variant) for task in args.tasks.split(",") for variant in args.variants.split(",")]
    if not args.table_only:
        for task, variant in cells:
            run_variant(task, variant, seeds, out, tuple(args.set))
    # Read the record only now, after hours of runs: another call (another task or seed) may have added to it
    # meanwhile, and what it added must survive this call's write.
    record = read_record(doc.with_suffix(".json"))
    for task, variant in cells:
        done = finished_seeds(out / task / variant, seeds)
        fresh = write_sweep_report(out / task / variant, done)["per_seed"] if done else {}
        old = record.get(task, {}).get(variant, {})
        if fresh and old and "per_seed" not in old:
            # A cell recorded with aggregates only: its seeds are rerun one call (or machine) at a time,
            # so it stays as recorded, with the reruns kept beside it, until they cover all its seeds.
            reruns = {**old.get("reruns", {}), **trim(fresh)}
            if not set(old.get("seeds", [])) <= set(reruns):
                print(f"{task}/{variant}: kept the cell recorded without per-seed reports (seeds "
                      f"{old.get('seeds')}) until its reruns cover them; reruns so far: {sorted(reruns)}",
                      file=sys.stderr)
                old["reruns"] = reruns
                continue
            old, fresh = {}, reruns
        reports = {**old.get("per_seed", {}), **fresh}  # a seed run here supersedes its recorded twin
        if fresh:
            record.setdefault(task, {})[variant] = cell(reports)
    # The table lists every recorded cell, in the order of TASKS and VARIANTS.
    results = {t: {v: record[t][v] for v in VARIANTS if v in record.get(t, {})} for t in TASKS if record.get(t)}
    if not results:
        sys.exit(f"no finished seed runs under {out}/<task>/<variant>/: check --out, or run them first")
    doc.write_text(table(results) + "\n" + HOW_RUN)
    keys = ("seeds", "students", "rounds", "ees_majority_share", "val_fell", "minutes_per_seed", "per_seed", "reruns")
    doc.with_suffix(".json").write_text(json.dumps(
        {t: {v: {k: a[k] for k in keys if k in a} for v, a in vs.items()} for t, vs in results.items()}, indent=1))
    print(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
