"""The EES ablation: plain vs class-balanced error extrapolation, with and without the fair student budget,
3 seeds each, on SST-2, RTE and QNLI; writes docs/ablation.md (and .json).

    .venv/bin/python scripts/ablation.py                       # every task and variant (many CPU hours)
    .venv/bin/python scripts/ablation.py --tasks sst2 --seeds 0,1,2 --variants plain,balanced

Each (task, variant) is an `s3ray sweep` in runs/ablation/<task>/<variant>, resumable: rerunning the script
continues unfinished runs and only rebuilds the table for finished ones; `--table-only` runs nothing and
tabulates the seed runs finished so far. Round 0 (rationales and seed synthesis) is the same request set in
every variant of a seed, so a variant's seed runs start from a copy of the first finished variant's teacher
cache: identical requests, identical answers, no tokens spent twice.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from s3ray.pipeline.sweep import spread_text, write_sweep_report

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


def majority_share(run_dir: Path, rounds: int) -> list[float]:
    """Per EES round (1..rounds) of one seed run, the largest label's share of the round's new rows."""
    import pyarrow.parquet as pq

    shares = []
    for r in range(1, rounds + 1):
        path = run_dir / "rounds" / f"round_{r}.parquet"
        if path.exists():
            labels = pq.read_table(path, columns=["label"]).column("label").to_pylist()
            if labels:
                shares.append(max(labels.count(x) for x in set(labels)) / len(labels))
    return shares


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
            fell, total = val_falls(agg.get("per_seed", {}))
            share = agg.get("ees_majority_share")
            used = ", ".join(map(str, agg.get("seeds", []))) or "–"
            lines.append(f"| {name} | {used} | " + " | ".join(cells) + f" | {'–' if plain_final is None else 'not reached' if reach is None else f'{reach:,.0f}'}"
                         + (f" | {fell} of {total}" if total else " | –")
                         + (f" | {100 * share:.0f}% |" if share is not None else " | – |"))
        students = [s["method"] for s in next(iter(variants.values())).get("students", [])]
        if students:
            lines += ["", f"Every student of the {task} runs, test accuracy (mean ± std over seeds):", "",
                      "| variant | " + " | ".join(students) + " | minutes per seed run |",
                      "|---|" + "---:|" * (len(students) + 1)]
            for name, agg in variants.items():
                by = {s["method"]: s["test"] for s in agg["students"]}
                minutes = [rep.get("total_seconds", 0) / 60 for rep in agg.get("per_seed", {}).values()]
                seeds = len(agg.get("seeds", []))
                lines.append(f"| {name} | " + " | ".join(spread_text(by.get(m, {}), seeds) for m in students)
                             + (f" | {sum(minutes) / len(minutes):.0f} |" if minutes else " | – |"))
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
    results: dict[str, dict[str, dict]] = {}
    for task in args.tasks.split(","):
        for variant in args.variants.split(","):
            if args.table_only:
                done = finished_seeds(out / task / variant, seeds)
                if not done:
                    continue
                agg = write_sweep_report(out / task / variant, done)
            else:
                done = seeds
                agg = json.loads(run_variant(task, variant, seeds, out, tuple(args.set)).read_text())
            shares = [x for seed in done
                      for x in majority_share(out / task / variant / f"seed{seed}", len(agg["rounds"]) - 1)]
            agg["ees_majority_share"] = sum(shares) / len(shares) if shares else None
            results.setdefault(task, {})[variant] = agg
    if not results:
        sys.exit(f"no finished seed runs under {out}/<task>/<variant>/: check --out, or run them first")
    doc = REPO / args.doc
    command = "python scripts/ablation.py " + " ".join(a for a in sys.argv[1:] if a != "--table-only")
    note = ""
    if any(s.startswith("baselines.") for s in args.set):
        # The baselines of a finished run can be added later by resuming it without these --set's.
        note = (" A '–' in a students table is a baseline these `--set baselines.*=false` switched off; the "
                "baseline figures shown come from resuming finished runs without those `--set`s.")
    doc.write_text(table(results) + f"\nThe runs: `{command}` (resumable; `--table-only` rebuilds this table from "
                   f"the finished ones); each sweep's own report: `{args.out}/<task>/<variant>/sweep_report.md`."
                   + note + "\n")
    doc.with_suffix(".json").write_text(json.dumps(
        {t: {v: {k: a.get(k) for k in ("seeds", "students", "rounds", "ees_majority_share")} for v, a in vs.items()}
         for t, vs in results.items()},
        indent=2))
    print(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
