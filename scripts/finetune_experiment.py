"""The fine-tuned-teacher experiment of issue #13: SmolLM2-135M-Instruct fine-tuned on 125 labelled rows vs
prompted as is, each annotating a pool and generating rows, a MiniLM student on each row set and on the 125
gold rows alone, every student evaluated on the task's test set. Writes docs/finetune-experiment.md (+ .json).

    .venv/bin/python scripts/finetune_experiment.py                          # both tasks, seed 0, full size
    .venv/bin/python scripts/finetune_experiment.py --tasks rte --seeds 1,2  # more seeds; they add up
    .venv/bin/python scripts/finetune_experiment.py --tasks sst2 --pool-size 1000 --per-label 150

Each (task, seed, arm) is one `s3ray finetune` run in <out>/<task>/seed<S>/<arm>, derived from the task's
committed config with overrides (printed as the equivalent command); the seed sets the fine-tune's adapter
initialisation and row order, the pool's order, the generation seeds and the student's. Resumable: a rerun
skips finished arms and, inside an unfinished one, finished steps. ft-generate uses ft-annotate's exported
teacher (one fine-tune per task and seed). The .json twin of the report, under version control, records every
seed's results, so seeds run in different invocations, sessions or machines add up: the report gives each arm's
mean ± std over the recorded seeds, then each seed's full table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from s3ray.pipeline.sweep import spread, spread_text  # after the path line: run as a script from anywhere

CONFIGS = {"sst2": "configs/finetune/sst2-smollm2-experiment.yaml",
           "rte": "configs/finetune/rte-smollm2-experiment.yaml"}
ARMS = ["ft-annotate", "ft-annotate-cal", "ft-annotate-cal-055", "ft-generate", "prompted-annotate",
        "prompted-annotate-cal", "prompted-generate", "gold-125"]
# The cheap arms first (a problem in the student or report shows before the long fine-tune); ft-generate
# needs ft-annotate's exported teacher.
RUN_ORDER = ["gold-125", "prompted-annotate", "prompted-annotate-cal", "prompted-generate", "ft-annotate",
             "ft-annotate-cal", "ft-annotate-cal-055", "ft-generate"]
CAL = "annotate.calibrate=pool_mean"
AS_IS = "training.method=none"
INTRO = """Written by `scripts/finetune_experiment.py` (every number also in `finetune-experiment.json` beside
this file); the recipe is described in [finetune.md](finetune.md). Per task, the embedded SmolLM2-135M-Instruct
teacher is either **fine-tuned** (LoRA r=16, merged; 125 labelled train rows, both directions: input -> label
and label -> input) or **prompted** as is (`training.method=none`, the same zero-shot prompts). Each teacher
**annotates** the pool (label = argmax of the label completions' summed log-probabilities, kept when the softmax
over them is >= the threshold) or **generates** rows from the same generation prompts (served by the teacher
pool: 2 single-thread vLLM CPU replicas, temperature 0.9, top-p 0.95, a seed per request). The MiniLM student
(`embedded:all-minilm-l6-v2`, the same settings in every arm; epoch picked on the validation set) trains on each
row set, and on the 125 gold rows alone (gold-125), and is evaluated once on the test set. Agreement is with the
pool's hidden gold labels; "kept" is agreement among the rows above the threshold. The **-cal** arms are the
same teacher's annotations with pool-mean calibration (`annotate.calibrate=pool_mean`: each label's mean
log-probability over the pool is subtracted before the argmax and the threshold); they reuse the uncalibrated
arm's saved scores where it has them. **ft-annotate-cal-055** is ft-annotate-cal at threshold 0.55 instead of
0.7 (more rows kept, at lower agreement); it became an arm after seed 0's table, where it was run once by hand
(docs/finetune.md).
"""


def arm_overrides(arm: str, task_dir: Path) -> list[str]:
    """The overrides that turn the task's config (the ft-annotate arm) into `arm`."""
    return {
        "ft-annotate": [],
        "ft-annotate-cal": [AS_IS, f"model.path={task_dir / 'ft-annotate' / 'export'}", CAL],
        # The calibrated fine-tuned annotator at a lower threshold: more rows kept at lower agreement.
        "ft-annotate-cal-055": [AS_IS, f"model.path={task_dir / 'ft-annotate' / 'export'}", CAL,
                                "annotate.threshold=0.55"],
        "ft-generate": [AS_IS, f"model.path={task_dir / 'ft-annotate' / 'export'}", "mode=generate"],
        "prompted-annotate": [AS_IS, "mode=annotate"],
        "prompted-annotate-cal": [AS_IS, "mode=annotate", CAL],
        "prompted-generate": [AS_IS, "mode=generate"],
        "gold-125": [AS_IS, "mode=none"],
    }[arm]


def _shown(text: str) -> str:
    """The committed record's paths relative to the repository, as the configs' data paths are, and ~ for the
    home cache (the runs themselves keep absolute paths: their recorded config must not change between resumes)."""
    return text.replace(str(REPO) + "/", "").replace(str(Path.home()) + "/", "~/")


def size_overrides(args) -> list[str]:
    out = []
    if args.pool_size:
        out.append(f"data.pool_size={args.pool_size}")
    if args.per_label:
        out.append(f"generate.per_label={args.per_label}")
    if args.max_steps:
        out.append(f"training.max_steps={args.max_steps}")
    return out


def run_arm(task: str, arm: str, out: Path, sizes: list[str], seed: int = 0, collect_only: bool = False) -> dict:
    """One arm of one seed through the recipe (resumed where it stopped); its report, step times and command.
    collect_only: only read a finished arm's results (an unfinished one is reported as such)."""
    from s3ray.finetune.config import load_finetune_config
    from s3ray.finetune.recipe import run_recipe

    seed_dir = out / task / f"seed{seed}"
    run_dir = seed_dir / arm
    sets = [f"run.output_dir={run_dir}", f"run.name={task}-{arm}-seed{seed}", f"run.seed={seed}",
            *arm_overrides(arm, seed_dir), *sizes]
    cmd = "s3ray finetune " + CONFIGS[task] + " --resume " + " ".join(f"--set {s}" for s in sets)
    print(f"\n=== {task} / {arm}\n$ {cmd}", flush=True)
    if finished(run_dir, arm):
        print("finished in an earlier run, skipped", flush=True)
        return _collect(run_dir, cmd.split(" --set data.pool_size=")[0].split(" --set generate.per_label=")[0])
    if collect_only:
        return {"command": cmd, "unfinished": "not run to the end yet: rerun the command (it resumes)"}
    donor = seed_dir / arm.split("-cal")[0] / "annotate_parts"
    if "-cal" in arm and donor.is_dir() and not (run_dir / "annotate_parts").exists():
        # The same teacher scoring the same pool in the same chunks: the calibrated arm reuses those scores.
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(donor, run_dir / "annotate_parts")
    t0 = time.perf_counter()
    run_recipe(load_finetune_config(REPO / CONFIGS[task], sets), resume=True)
    print(f"{task}/{arm}: {time.perf_counter() - t0:.0f} s", flush=True)
    return _collect(run_dir, cmd)


def finished(run_dir: Path, arm: str) -> bool:
    manifest = run_dir / "manifest.json"
    if not ((run_dir / "report.json").is_file() and manifest.is_file()):
        return False
    return all(k in json.loads(manifest.read_text())["steps"] for k in _expected_steps(arm))


def _expected_steps(arm: str) -> list[str]:
    made = {"gold-125": []}.get(arm, ["annotate" if "annotate" in arm else "generate"])
    return ["finetune", *made, "student"]


def _collect(run_dir: Path, cmd: str) -> dict:
    """The arm's results from its manifest; the command gets the sizes the arm really ran with."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    steps, cfg = manifest["steps"], manifest["config"]
    if "data.pool_size=" not in cmd and cfg["data"].get("pool_size"):
        cmd += f" --set data.pool_size={cfg['data']['pool_size']}"
    if "generate.per_label=" not in cmd and cfg["generate"]["per_label"] != 500:
        cmd += f" --set generate.per_label={cfg['generate']['per_label']}"
    return {"command": cmd, "run_dir": str(run_dir),
            "steps": {k: {"result": v["result"], "seconds": v["seconds"]} for k, v in steps.items()}}


def machine() -> dict:
    import torch
    import transformers

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=False)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "commit": commit.stdout.strip(), "load_average": [round(x, 2) for x in os.getloadavg()]}


# ------------------------------------------------------------------------------------------ report


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _secs(arm: dict, step: str) -> str:
    s = arm.get("steps", {}).get(step)
    return "—" if s is None or "skipped" in s["result"] else f"{s['seconds']:.0f}"


def _arm_row(name: str, arm: dict) -> str:
    if "error" in arm or "unfinished" in arm:
        why = f"failed: {arm['error'].splitlines()[-1][:80]}" if "error" in arm else "**unfinished** (see below)"
        return f"| {name} | {why} |" + " |" * 8
    st = arm["steps"]
    stu = st.get("student", {}).get("result", {})
    test = stu.get("test_metrics", {})
    made = st.get("annotate") or st.get("generate")
    rows = stu.get("n_train", "—")
    teacher = "—"
    if "annotate" in st:
        a = made["result"]
        teacher = (f"agreement {_pct(a.get('agreement'))}% (kept {_pct(a.get('agreement_kept'))}%), "
                   f"coverage {_pct(a['coverage'])}% of {a['n']}")
    elif "generate" in st:
        g = made["result"]
        drops = ", ".join(f"{k} {v}" for k, v in sorted(g["dropped"].items())) or "none"
        teacher = f"kept {g['kept']} of {g['requested']} (dropped: {drops})"
    return (f"| {name} | {teacher} | {rows} | {_pct(test.get('accuracy'))} | {_pct(test.get('macro_f1'))} | "
            f"{_pct(stu.get('val_metrics', {}).get('accuracy'))} | {stu.get('best_epoch', '—')} | "
            f"{_secs(arm, 'finetune')} | {_secs(arm, 'annotate') if 'annotate' in st else _secs(arm, 'generate')}"
            f" | {_secs(arm, 'student')} |")


def _finetune_line(arm: dict) -> str:
    ft = arm.get("steps", {}).get("finetune", {}).get("result", {})
    if not ft or "steps" not in ft:
        return ""
    return (f"Fine-tune (LoRA, merged): {ft['n_examples']} training examples (125 rows x both directions), "
            f"{ft['steps']} optimizer steps, loss {ft['first_loss']:.3f} -> {ft['final_loss']:.3f}, "
            f"{ft['wall_seconds']:.0f} s.\n\n")


def _figure(arm: dict, step: str, *keys: str):
    """A number from a finished arm's step result (None where the arm or figure is missing)."""
    x = arm.get("steps", {}).get(step, {}).get("result", {})
    for k in keys:
        x = x.get(k) if isinstance(x, dict) else None
    return x


def arm_spread(by_seed: dict[str, dict], arm: str) -> dict:
    """One arm over the seeds that finished it: test accuracy, test macro-F1, student rows and (annotating
    arms) the teacher's agreement with the pool's hidden labels, each as sweep.spread's mean/std/n."""
    done = [arms[arm] for arms in by_seed.values() if "steps" in arms.get(arm, {})]
    return {"test": spread([_figure(a, "student", "test_metrics", "accuracy") for a in done]),
            "macro_f1": spread([_figure(a, "student", "test_metrics", "macro_f1") for a in done]),
            "rows": spread([_figure(a, "student", "n_train") for a in done]),
            "agreement": spread([_figure(a, "annotate", "agreement") for a in done])}


def _summary(by_seed: dict[str, dict]) -> list[str]:
    seeds = sorted(by_seed, key=int)
    lines = [(f"Over seeds {', '.join(seeds)}: mean ± sample std of the arms each seed finished (a figure "
              "from fewer seeds says how many).\n"),
             "| arm | test acc % | test macro-F1 % | student rows | teacher agreement % |",
             "|---|---:|---:|---:|---:|"]
    for name in ARMS:
        if any(name in arms for arms in by_seed.values()):
            a = arm_spread(by_seed, name)
            pct = [spread_text(a[k], len(seeds)) if a[k]["n"] else "—" for k in ("test", "macro_f1", "agreement")]
            rows = spread_text(a["rows"], len(seeds), pct=False) if a["rows"]["n"] else "—"
            lines.append(f"| {name} | {pct[0]} | {pct[1]} | {rows} | {pct[2]} |")
    return lines


def read_results(json_path: Path) -> dict:
    """The recorded results, {task: {seed: {arm: ...}}}. Records written before --seeds held seed 0's arms
    directly under the task; they are read as seed 0."""
    if not json_path.is_file():
        return {}
    results = json.loads(json_path.read_text())["results"]
    return {task: ({"0": v} if set(v) & set(ARMS) else v) for task, v in results.items()}


def write_report(results: dict, meta: dict, md: Path) -> None:
    record = md.with_suffix(".json")
    text = _shown(json.dumps({"meta": meta, "results": results}, indent=2, default=str))
    saved = json.loads(text)  # the Markdown shows what the record holds
    meta, results = saved["meta"], saved["results"]
    tmp = record.with_name(f".{record.name}.{os.getpid()}.tmp")  # a reader never sees half a record
    tmp.write_text(text)
    os.replace(tmp, record)
    m = meta["machine"]
    lines = [
        "# Fine-tuned vs prompted teacher: the measured experiment (issue #13)\n",
        INTRO,
        (f"Last invocation: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB (load average "
         f"{m['load_average']} at the start, {meta.get('load_average_end')} at the end); torch {m['torch']}, "
         f"transformers {m['transformers']}, commit {m['commit']}.\n"),
        f"Command: `{meta['command']}` (total {meta.get('total_seconds', 0):.0f} s in this invocation).\n",
    ]
    for task, by_seed in results.items():
        lines.append(f"\n## {task}\n")
        lines += _summary(by_seed)
        for seed in sorted(by_seed, key=int):
            arms = by_seed[seed]
            lines.append(f"\n### {task}, seed {seed}\n")
            if "ft-annotate" in arms:
                lines.append(_finetune_line(arms["ft-annotate"]))
            lines += [("| arm | teacher | student rows | test acc % | test macro-F1 % | val acc % | best epoch | "
                       "fine-tune s | annotate/generate s | student s (fit + test) |"),
                      "|---|---|---|---|---|---|---|---|---|---|"]
            lines += [_arm_row(name, arms[name]) for name in ARMS if name in arms]
            lines.append("\nCommands (each resumable):\n")
            if any("data.pool_size=" in a.get("command", "") for a in arms.values()):
                lines.append("**Reduced sizes** (`data.pool_size` / `generate.per_label` in the commands): the "
                             "full experiment (the whole pool, 1,000 generated rows) is the same commands without "
                             "them.\n")
            lines += [f"- {name}: `{arms[name]['command']}`"
                      for name in ARMS if name in arms and "command" in arms[name]]
    md.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="sst2,rte", help="comma-separated: sst2, rte")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ", ".join(ARMS))
    ap.add_argument("--seeds", default="0", help="comma-separated run seeds, e.g. 0,1,2; each adds to the record")
    ap.add_argument("--out", default="runs/finetune-experiment", help="run directories go here")
    ap.add_argument("--pool-size", type=int, default=None, help="annotate only this many pool rows")
    ap.add_argument("--per-label", type=int, default=None, help="generate.per_label (rows = 2 x this)")
    ap.add_argument("--max-steps", type=int, default=None, help="cap the fine-tune's optimizer steps")
    ap.add_argument("--doc", default="docs/finetune-experiment.md", help="the Markdown report (JSON beside it)")
    ap.add_argument("--report-only", action="store_true", help="rebuild the Markdown from the JSON; run nothing")
    ap.add_argument("--collect", action="store_true", help="report the finished arms found under --out; run "
                    "nothing (arms run by separate invocations, sizes taken from --pool-size/--per-label)")
    args = ap.parse_args(argv)
    doc = REPO / args.doc
    if args.report_only:
        saved = json.loads(doc.with_suffix(".json").read_text())
        write_report(read_results(doc.with_suffix(".json")), saved["meta"], doc)
        return 0
    tasks, arms = args.tasks.split(","), args.arms.split(",")
    try:
        seeds = [int(x) for x in args.seeds.split(",")]
    except ValueError:
        ap.error(f"--seeds: comma-separated integers, e.g. 0,1,2 (got {args.seeds!r})")
    bad = [t for t in tasks if t not in CONFIGS] + [a for a in arms if a not in ARMS]
    if bad:
        ap.error(f"unknown task/arm {bad}: tasks are {sorted(CONFIGS)}, arms {ARMS}")
    out = Path(args.out).resolve()
    t0 = time.perf_counter()
    meta = {"machine": machine(), "command": "python scripts/finetune_experiment.py " + " ".join(argv or sys.argv[1:]),
            "sizes": size_overrides(args)}
    if args.collect:  # the arms ran in other invocations; their own commands and step times are in the tables
        meta["command"] += " (only collects finished arms; each arm's command and step times are below)"
    failed = False
    for task in tasks:
        for seed in seeds:
            for arm in RUN_ORDER:
                if arm not in arms:
                    continue
                try:
                    result = run_arm(task, arm, out, size_overrides(args), seed, args.collect)
                except Exception as e:  # noqa: BLE001 - recorded in the report and the exit code, never dropped
                    traceback.print_exc()
                    result = {"error": f"{type(e).__name__}: {e}"}
                    failed = True
                # Read the record again after each arm (hours): a call running beside this one (another task
                # or seed) may have added to it meanwhile; other tasks, seeds and arms are kept as recorded.
                results = read_results(doc.with_suffix(".json"))
                results.setdefault(task, {}).setdefault(str(seed), {})[arm] = result
                meta.update(total_seconds=time.perf_counter() - t0,
                            load_average_end=[round(x, 2) for x in os.getloadavg()])
                write_report(results, meta, doc)
    print(f"wrote {doc} and {doc.with_suffix('.json')}")
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
