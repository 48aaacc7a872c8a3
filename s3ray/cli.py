"""The `s3ray` command line.

Each command imports what it needs inside its function, so `s3ray --help` and bad-argument errors answer at
once instead of after importing Ray, torch and pyarrow."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

DESCRIPTION = """\
s3ray: Synthesis Step by Step on Ray.

A teacher LLM writes a seed dataset (label rationales, then examples), a student is trained on it, the
student's errors on a small real validation set go back to the teacher, which writes new examples like each
error; repeat for R rounds. Every step is recorded in the run directory, so an interrupted run continues
with --resume.

examples:
  s3ray run configs/sst2_quickstart.yaml              # the quickstart (CPU, embedded models)
  s3ray run configs/sst2_quickstart.yaml --resume     # continue an interrupted run
  s3ray run configs/sst2_quickstart.yaml --resume-if-exists   # continue it, or start it if there is none
  s3ray run my.yaml --set synthesis.rounds=1 --set teacher.replicas=4
  s3ray generate my.yaml --rows 100000               # a large synthetic corpus, sharded Parquet
  s3ray validate my.yaml                              # check config, data and models; generate nothing
  s3ray config --explain                              # every config field, its default and meaning
  s3ray serve my.yaml --port 8000                     # the teacher as an OpenAI-compatible server
  s3ray report runs/sst2-quickstart                   # rebuild a run's report
"""


def _setup_logging(log_file: Path | None = None, verbose: bool = False) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=handlers,
        force=True,
    )


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config (YAML); examples in configs/")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field, e.g. --set synthesis.rounds=1 (repeatable)")


def _check_stop_after(step: str | None, cfg) -> None:
    from s3ray.config import ConfigError
    from s3ray.pipeline.steps import check_step_name

    if step is not None:
        try:
            check_step_name(step, cfg)
        except ValueError as e:
            raise ConfigError(f"--stop-after {e}") from None


def _check_cluster(cfg, students: bool = True, backend: str | None = None) -> list[str]:
    """Join the configured Ray cluster and check the run fits its free resources (CapacityError if not),
    before any model loads or run directory exists. A local cluster (no ray.address) starts with the run
    and is checked then."""
    if not cfg.ray.address:
        return ["not checked yet (no ray.address: the local cluster is checked when the run starts it)"]
    from s3ray.capacity import check_capacity
    from s3ray.runtime import init_ray

    init_ray(cfg.ray.address)  # the run joins the same cluster later (init_ray is idempotent)
    return check_capacity(cfg, students=students, backend=backend).lines


def _cmd_run(args) -> int:
    from s3ray import storage
    from s3ray.config import ConfigError, load_config
    from s3ray.pipeline.mirror import working_copy
    from s3ray.pipeline.rundir import check_can_open, holds_run
    from s3ray.pipeline.s3 import prepare_inputs, run_s3

    cfg = load_config(args.config, args.overrides)
    if cfg.run.seeds:  # one run per seed and their spread: the sweep
        if args.stop_after:
            raise ConfigError("--stop-after: not with run.seeds (a sweep); run one seed with --set run.seeds=null")
        print(f"run.seeds is set: running the sweep over seeds {cfg.run.seeds} (as `s3ray sweep`)")
        return _sweep(cfg, cfg.run.seeds, args.resume or args.resume_if_exists, args.verbose)
    _check_stop_after(args.stop_after, cfg)
    out = cfg.run.output_dir  # a path, or an object store URI (s3://...)
    resume = args.resume or (args.resume_if_exists and holds_run(out))
    check_can_open(out, resume)
    _setup_logging(None, args.verbose)
    _check_cluster(cfg)
    inputs = prepare_inputs(cfg)  # data and models are checked before anything expensive starts
    local = Path(out) if storage.is_local(out) else working_copy(storage.absolute_output_dir(out), cfg.run.local_dir)
    _setup_logging(local / "run.log", args.verbose)  # the run dir is created only once its inputs are sound
    rep = run_s3(cfg, resume=resume, inputs=inputs, stop_after=args.stop_after)
    print(f"\nreport: {storage.join(out, 'report.md')}  (JSON: report.json, plot: report.png)")
    print(f"final synthetic dataset: {storage.join(out, 'final/train.parquet')}")
    for row in rep["comparison"]:
        t = row["test"]
        print(f"  {row['method']:<40} test {rep['metric']}: {'–' if t is None else f'{100 * t:.2f}'}")
    return 0


def _cmd_generate(args) -> int:
    from s3ray import storage
    from s3ray.config import load_config
    from s3ray.pipeline.s3 import prepare_inputs
    from s3ray.synthesis.corpus import generate_corpus

    overrides = args.overrides + ([f"synthesis.corpus_rows={args.rows}"] if args.rows else [])
    cfg = load_config(args.config, overrides)
    _setup_logging(None, args.verbose)
    _check_cluster(cfg, students=False, backend=args.backend)
    inputs = prepare_inputs(cfg)  # data and models are checked before anything expensive starts
    card = generate_corpus(cfg, inputs, resume=args.resume, backend=args.backend)
    out = storage.absolute_output_dir(cfg.run.output_dir)
    print(f"corpus: {card['rows']} rows in {card['shards']} shard(s) under {storage.join(out, 'corpus')} "
          f"(card: {storage.join(out, 'corpus_card.json')})")
    print(f"dropped: {card['dropped'] or 'none'}")
    return 0


def _cmd_sweep(args) -> int:
    from s3ray.config import ConfigError, load_config

    overrides = args.overrides + ([f"run.parallel_seeds={args.parallel}"] if args.parallel else [])
    cfg = load_config(args.config, overrides)
    try:
        seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else cfg.run.seeds
    except ValueError:
        raise ConfigError(f"--seeds: whole numbers separated by commas, e.g. 0,1,2 (got {args.seeds!r})") from None
    if not seeds:
        raise ConfigError("sweep: no seeds; pass --seeds 0,1,2 or set run.seeds: [0, 1, 2]")
    return _sweep(cfg, seeds, args.resume, args.verbose)


def _sweep(cfg, seeds: list[int], resume: bool, verbose: bool) -> int:
    from s3ray import storage
    from s3ray.pipeline.sweep import run_sweep, spread_text

    out = cfg.run.output_dir  # a path, or an object store URI
    _setup_logging(Path(out) / "sweep.log" if storage.is_local(out) else None, verbose)
    agg = run_sweep(cfg, seeds, resume=resume)
    print(f"\nsweep report: {storage.join(out, 'sweep_report.md')}")
    for s in agg["students"]:
        print(f"  {s['method']:<40} test {agg['metric']}: {spread_text(s['test'], len(seeds))}")
    return 0


def _cmd_validate(args) -> int:
    from s3ray.config import load_config
    from s3ray.pipeline.s3 import prepare_inputs

    cfg = load_config(args.config, args.overrides)
    _setup_logging(None, args.verbose)
    capacity = _check_cluster(cfg)
    inp = prepare_inputs(cfg, resolve_models=not args.skip_models)
    print(f"config ok: task {inp.task.type}, labels {inp.task.labels}")
    print("capacity: " + "; ".join(capacity))
    print(f"validation rows: {len(inp.validation)}, test rows: {len(inp.test) if inp.test else 0}")
    if not args.skip_models:
        print(f"teacher: {inp.teacher_path}\nstudent: {inp.student_path}")
    return 0


def _cmd_config(args) -> int:
    from s3ray.config import explain

    print("\n".join(explain()))
    return 0


def _cmd_serve(args) -> int:
    from s3ray.config import load_config
    from s3ray.models import resolve_teacher
    from s3ray.teacher.serve import serve

    cfg = load_config(args.config, args.overrides)
    _setup_logging(None, args.verbose)
    return serve(cfg.teacher, resolve_teacher(cfg.teacher.model), host=args.host, port=args.port,
                 api_key_env=args.api_key_env)


def _cmd_report(args) -> int:
    from s3ray import storage
    from s3ray.pipeline.report import write_report
    from s3ray.pipeline.rundir import RunDir, holds_run
    from s3ray.pipeline.sweep import finished_seeds, write_sweep_report

    if not holds_run(args.run_dir) and (seeds := finished_seeds(args.run_dir)):
        # A sweep directory: its seed runs may have run apart (other machines, other days); their report.json
        # files copied into one folder are enough for the spread.
        write_sweep_report(args.run_dir, seeds)
        print(f"wrote {storage.join(args.run_dir, 'sweep_report.md')} (seeds {', '.join(map(str, seeds))})")
        return 0
    write_report(RunDir.open_existing(args.run_dir))  # read-only: works beside a running driver
    print(f"wrote {storage.join(args.run_dir, 'report.md')}")
    return 0


def _cmd_prepare(args) -> int:
    from s3ray.models import EMBEDDED_STUDENT, EMBEDDED_TEACHER, resolve_student, resolve_teacher

    _setup_logging(None, args.verbose)
    print("teacher:", resolve_teacher(EMBEDDED_TEACHER))
    print("student:", resolve_student(EMBEDDED_STUDENT))
    return 0


def _cmd_finetune(args) -> int:
    from s3ray.finetune.recipe import run_from_cli

    _setup_logging(None, args.verbose)
    return run_from_cli(args.config, args.overrides, plan_only=args.plan, resume=args.resume)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="s3ray", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run (or resume) an S3 loop and write its report",
                       description="Run the S3 loop: rationales, seed synthesis, then R rounds of train -> mine "
                       "errors -> extrapolate errors, then the baselines, then the report.")
    _add_config_args(r)
    how = r.add_mutually_exclusive_group()
    how.add_argument("--resume", action="store_true",
                     help="continue the run in run.output_dir from its last finished step (no regeneration); "
                     "an error if there is no run there")
    how.add_argument("--resume-if-exists", action="store_true",
                     help="continue the run in run.output_dir if there is one, else start it (make demo, "
                     "resubmitted Ray jobs)")
    r.add_argument("--stop-after", metavar="STEP",
                   help="pause after this step (a manifest step name, e.g. round0/train); --resume continues")
    r.set_defaults(fn=_cmd_run)

    g = sub.add_parser("generate", help="stream a large synthetic corpus (synthesis.corpus_rows) to Parquet shards",
                       description="Rationales, then seed-style rows written shard by shard to "
                       "<run.output_dir>/corpus/part-XXXXX.parquet, deduplicated corpus-wide; resumable.")
    _add_config_args(g)
    g.add_argument("--rows", type=int, metavar="N", help="rows to write (overrides synthesis.corpus_rows)")
    g.add_argument("--resume", action="store_true", help="continue the corpus in run.output_dir")
    g.add_argument("--backend", choices=["ray", "local", "http"], default=None,
                   help="where the teacher runs (default: ray replicas; http for engine openai)")
    g.set_defaults(fn=_cmd_generate)

    sw = sub.add_parser("sweep", help="run an S3 config once per seed and report mean ± std",
                        description="One whole S3 run per seed in <run.output_dir>/seed<N>, then "
                        "sweep_report.md/json with mean ± sample std per student and per round. Seeds run side "
                        "by side as Ray tasks where the cluster has room, else one after another.")
    _add_config_args(sw)
    sw.add_argument("--seeds", metavar="S1,S2,...", help="seeds, e.g. 0,1,2 (default: run.seeds of the config)")
    sw.add_argument("--resume", action="store_true", help="continue unfinished seed runs (finished ones are kept)")
    sw.add_argument("--parallel", metavar="N|auto", help="seed runs at once (default: run.parallel_seeds, auto: as "
                    "many as fit the cluster's free resources; 1 on a small box)")
    sw.set_defaults(fn=_cmd_sweep)

    v = sub.add_parser("validate", help="check a config, its data and models without generating anything")
    _add_config_args(v)
    v.add_argument("--skip-models", action="store_true", help="check config and data only")
    v.set_defaults(fn=_cmd_validate)

    c = sub.add_parser("config", help="explain every config field")
    c.add_argument("--explain", action="store_true", help="(default) list fields with defaults and meaning")
    c.set_defaults(fn=_cmd_config)

    s = sub.add_parser("serve", help="serve the configured teacher as an OpenAI-compatible HTTP endpoint (vLLM)")
    _add_config_args(s)
    s.add_argument("--host", default="127.0.0.1", help="interface to bind (default: local only)")
    s.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    s.add_argument("--api-key-env", metavar="VAR", default=None,
                   help="require this API key, read from environment variable VAR (clients send it as Bearer)")
    s.set_defaults(fn=_cmd_serve)

    rep = sub.add_parser("report", help="rebuild the report (Markdown, JSON, PNG) of a run or sweep directory",
                         description="Rebuild a run's report.md/json/png from its manifest, or, given a sweep "
                         "directory (seed<N>/report.json below it, no manifest), its sweep_report.md/json over "
                         "every seed whose report.json is there. Seed runs made apart can be gathered that way.")
    rep.add_argument("run_dir", help="a run's run.output_dir (holds manifest.json), e.g. runs/sst2-quickstart, "
                     "or a sweep's, e.g. runs/adqa")
    rep.set_defaults(fn=_cmd_report)

    ft = sub.add_parser("finetune", help="fine-tune the teacher on labelled rows, then annotate or generate")
    _add_config_args(ft)
    ft.add_argument("--plan", action="store_true", help="print the memory plan and DeepSpeed config; train nothing")
    ft.add_argument("--resume", action="store_true", help="continue from the run's last step/checkpoint")
    ft.set_defaults(fn=_cmd_finetune)

    prep = sub.add_parser("prepare-models", help="install-time step: convert the embedded teacher, locate the student")
    prep.set_defaults(fn=_cmd_prepare)
    return p


def main(argv: list[str] | None = None) -> int:
    from s3ray.config import ConfigError
    from s3ray.data.load import DataError
    from s3ray.models import ModelNotFound
    from s3ray.pipeline.rundir import RunDirError
    from s3ray.pipeline.steps import StepFailed
    from s3ray.pipeline.sweep import SweepFailed
    from s3ray.storage import StorageError

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, DataError, ModelNotFound, RunDirError) as e:
        # The project's own errors already say what to fix: one line, no traceback.
        print("error: " + " ".join(line.strip() for line in str(e).splitlines() if line.strip()), file=sys.stderr)
        return 2
    except (StepFailed, StorageError, SweepFailed) as e:  # the run stopped cleanly; what finished is kept
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: finished steps are kept; continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
