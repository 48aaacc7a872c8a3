"""The run report: report.md for people, report.json for programs, report.png for the eye.

Built only from the manifest, so `s3ray report RUN_DIR` can rebuild it at any time.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from s3ray.pipeline import steps as step_names
from s3ray.pipeline.rundir import RunDir, atomic_write_bytes
from s3ray.tasks import task_class


def _metric_name(task_type: str) -> str:
    return task_class(task_type).primary_metric


def _secondary_metric_name(task_type: str) -> str:
    """Reported beside the primary metric (QA: SQuAD's exact match; label tasks: macro-F1)."""
    return task_class(task_type).secondary_metric


def _budget(student: dict) -> str:
    """How much training each student got, in words (a fair comparison states it)."""
    rule = f"up to {student['epochs']} epochs"
    if student.get("min_steps"):
        rule = (f"at least {student['min_steps']} optimizer steps (epochs raised from {student['epochs']} "
                f"to reach them, at most {student.get('max_epochs')})")
    return (f"Every student trains {rule} at batch {student['batch_size']}; its best epoch is picked on the real "
            "validation set, or, for students that train on real rows, on a held-out slice of them.")


def _fmt(x, pct=True) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.2f}" if pct else str(x)


def build_report(run: RunDir) -> dict:
    cfg = run.manifest["config"]
    steps = run.steps()
    metric = _metric_name(cfg["task"]["type"])
    second = _secondary_metric_name(cfg["task"]["type"])
    rounds_n = cfg["synthesis"]["rounds"]

    def res(step: step_names.Step):
        return steps.get(step.name, {}).get("result")

    def scores(trained: dict | None) -> dict:
        """A trained student's validation and test numbers (None where it has none yet)."""
        trained = trained or {}
        test = trained.get("test") or {}
        return {"val": (trained.get("val") or {}).get(metric), "test": test.get(metric),
                "test_secondary": test.get(second)}

    per_round = []
    total_rows = 0
    for r in range(rounds_n + 1):
        syn = res(step_names.synthesis(r)) or {}
        stats = syn.get("stats", {})
        total_rows += syn.get("rows", 0)
        tr = res(step_names.train(r)) or {}
        mine = res(step_names.mine(r)) or {}
        tokens = stats.get("prompt_tokens", 0) + stats.get("output_tokens", 0)
        if r == 0 and res(step_names.RATIONALES):
            tokens += sum(res(step_names.RATIONALES)["stats"].get(k, 0) for k in ("prompt_tokens", "output_tokens"))
        per_round.append({
            "round": r,
            "new_rows": syn.get("rows"),
            "new_by_label": syn.get("by_label"),
            "total_rows": total_rows if syn else None,
            "train_rows": tr.get("n_train"),
            "best_epoch": tr.get("best_epoch"),
            **scores(tr),
            "errors_mined": mine.get("n_errors"),
            "teacher_tokens": tokens,
            "teacher_output_tokens": stats.get("output_tokens", 0),
        })

    last = per_round[-1]
    eq = res(step_names.EQUAL_BUDGET_TRAIN)
    real = res(step_names.REAL_VALIDATION_TRAIN)
    comparison = [
        {"method": "seed only (round 0, ZeroGen-style)", "train_rows": per_round[0]["train_rows"],
         **scores(res(step_names.train(0)))},
        {"method": "seed only, equal budget", "train_rows": eq and eq["n_train"], **scores(eq)},
        {"method": f"S3 after {rounds_n} round(s)", "train_rows": last["train_rows"],
         **scores(res(step_names.train(rounds_n)))},
        {"method": "real validation rows only", "train_rows": real and real["n_train"], **scores(real),
         "note": real and f"epoch picked on {real.get('holdout_rows')} held-out validation rows"},
    ]
    plus = res(step_names.S3_PLUS_REAL_TRAIN)
    if plus:  # runs made before this student existed have no such row
        comparison.append({"method": "S3 + real validation rows", "train_rows": plus["n_train"], **scores(plus),
                           "note": f"epoch picked on {plus.get('holdout_rows')} held-out validation rows"})

    generation = []
    for name, step in steps.items():
        stats = (step["result"] or {}).get("stats") if isinstance(step.get("result"), dict) else None
        if stats:
            generation.append({"step": name, **stats})
    timings = [{"step": name, "seconds": s["seconds"]} for name, s in steps.items()]
    return {
        "run": cfg["run"]["name"],
        "task": cfg["task"]["type"],
        "metric": metric,
        "secondary_metric": second,
        "teacher": cfg["teacher"]["model"],
        "teacher_engine": cfg["teacher"]["engine"],
        "student": cfg["student"]["model"],
        "comparison": comparison,
        "rounds": per_round,
        "generation": generation,
        "timings": timings,
        "total_seconds": round(sum(t["seconds"] for t in timings), 1),
        "complete": step_names.train(rounds_n).name in steps,
        "student_budget": _budget(cfg["student"]),
    }


def _plot(report: dict, path: Path) -> None:
    import matplotlib  # lazy: only the plot needs it, and Agg must be chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.3]})
    rounds = [r["round"] for r in report["rounds"] if r["val"] is not None]
    for key, style in (("val", "o-"), ("test", "s-")):
        ys = [100 * r[key] for r in report["rounds"] if r["val"] is not None and r[key] is not None]
        if ys:
            ax1.plot(rounds[: len(ys)], ys, style, label=f"S3 {key}")
    colors = {"seed only, equal budget": "tab:red", "real validation rows only": "tab:green"}
    for row in report["comparison"]:
        if row["method"] in colors and row["test"] is not None:
            ax1.axhline(100 * row["test"], ls="--", color=colors[row["method"]], label=f"{row['method']} (test)")
    ax1.set_xlabel("round (0 = seed only)")
    ax1.set_ylabel(f"{report['metric']} (%)")
    ax1.set_xticks(rounds or [0])
    ax1.set_title(f"Student {report['metric']} per round")
    if ax1.get_legend_handles_labels()[0]:  # a run paused before its first evaluation has no lines yet
        ax1.legend(fontsize=8)
    else:
        ax1.text(0.5, 0.5, "no student evaluated yet", ha="center", va="center", transform=ax1.transAxes)
    ax1.grid(alpha=0.3)
    names = [t["step"] for t in report["timings"]]
    ax2.barh(names, [t["seconds"] for t in report["timings"]], color="tab:blue")
    ax2.invert_yaxis()
    ax2.set_xlabel("seconds")
    ax2.set_title("Time per step")
    ax2.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _markdown(rep: dict) -> str:
    m = rep["metric"]
    m2 = rep.get("secondary_metric", "")  # reports written before it existed lack it
    lines = [
        f"# s3ray run report: {rep['run']}",
        "",
        f"Task **{rep['task']}** · teacher **{rep['teacher']}** ({rep['teacher_engine']}) · student "
        f"**{rep['student']}** · total step time {rep['total_seconds']:.0f} s"
        + ("" if rep["complete"] else " · **run incomplete**"),
        "",
        "## Students compared (measured in this run)",
        "",
        rep.get("student_budget", ""),
        "",
        f"| method | train rows | validation {m} | test {m} | test {m2} |",
        "|---|---:|---:|---:|---:|",
    ]
    for c in rep["comparison"]:
        note = f" ({c['note']})" if c.get("note") else ""
        lines.append(f"| {c['method']}{note} | {_fmt(c['train_rows'], False)} | {_fmt(c['val'])} | "
                     f"{_fmt(c['test'])} | {_fmt(c.get('test_secondary'))} |")
    lines += [
        "",
        ("The validation set picks each S3 student's best epoch and supplies the errors, so its numbers are optimistic;"
        " read the test column."),
        "",
        "## Rounds",
        "",
        (f"| round | new rows | new rows by label | synthetic rows | best epoch | validation {m} | test {m} | "
         "errors mined | teacher tokens |"),
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rep["rounds"]:
        by_label = ", ".join(f"{k}: {v}" for k, v in (r.get("new_by_label") or {}).items()) or "–"
        lines.append(
            f"| {r['round']} | {_fmt(r['new_rows'], False)} | {by_label} | {_fmt(r['total_rows'], False)} | "
            f"{_fmt(r['best_epoch'], False)} | {_fmt(r['val'])} | {_fmt(r['test'])} | "
            f"{_fmt(r['errors_mined'], False)} | {r['teacher_tokens']:,} |"
        )
    lines += ["", "## Teacher output: generated, kept, dropped", "",
              "| step | requested | kept | failed calls | dropped (reason: count) | from cache | tokens in / out |",
              "|---|---:|---:|---:|---|---:|---|"]
    for g in rep["generation"]:
        dropped = ", ".join(f"{k}: {v}" for k, v in sorted(g["dropped"].items())) or "–"
        lines.append(f"| {g['step']} | {g['requested']} | {g['kept']} | {g['failed_calls']} | {dropped} | "
                     f"{g.get('cached', 0)} | {g['prompt_tokens']:,} / {g['output_tokens']:,} |")
    lines += ["", "Rationale steps count replies kept; example steps count rows kept.", "",
              "## Time per step", "", "| step | seconds |", "|---|---:|"]
    lines += [f"| {t['step']} | {t['seconds']:.1f} |" for t in rep["timings"]]
    lines += ["", "![accuracy and time](report.png)", ""]
    return "\n".join(lines)


def write_report(run: RunDir) -> dict:
    rep = build_report(run)
    # Atomically: a driver killed while writing its report must not leave a torn report.json behind.
    atomic_write_bytes(run.path / "report.json", json.dumps(rep, indent=2).encode())
    _plot(rep, run.path / "report.png")
    atomic_write_bytes(run.path / "report.md", _markdown(rep).encode())
    # An object store run: to its URI. run.log only from the driver (which holds the lock): `s3ray report` on
    # another machine may have a stale copy of it.
    for name in ("report.json", "report.png", "report.md", *(["run.log"] if run.holds_lock else [])):
        run.push(name)
    return rep
