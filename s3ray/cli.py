"""The `s3ray` command line."""

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
  s3ray run my.yaml --set synthesis.rounds=1 --set teacher.replicas=4
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


def _cmd_run(args) -> int:
    from s3ray.config import load_config
    from s3ray.pipeline.s3 import prepare_inputs, run_s3

    cfg = load_config(args.config, args.overrides)
    _setup_logging(Path(cfg.run.output_dir) / "run.log", args.verbose)
    inputs = prepare_inputs(cfg)  # data and models are checked before anything expensive starts
    rep = run_s3(cfg, resume=args.resume, inputs=inputs, stop_after=args.stop_after)
    out = Path(cfg.run.output_dir)
    print(f"\nreport: {out / 'report.md'}  (JSON: report.json, plot: report.png)")
    print(f"final synthetic dataset: {out / 'final' / 'train.parquet'}")
    for row in rep["comparison"]:
        t = row["test"]
        print(f"  {row['method']:<40} test {rep['metric']}: {'–' if t is None else f'{100 * t:.2f}'}")
    return 0


def _cmd_validate(args) -> int:
    from s3ray.config import load_config
    from s3ray.pipeline.s3 import prepare_inputs

    cfg = load_config(args.config, args.overrides)
    _setup_logging(None, args.verbose)
    inp = prepare_inputs(cfg, resolve_models=not args.skip_models)
    print(f"config ok: task {inp.task.type}, labels {inp.task.labels}")
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
    return serve(cfg.teacher, resolve_teacher(cfg.teacher.model), host=args.host, port=args.port)


def _cmd_report(args) -> int:
    import json

    from s3ray.pipeline.report import write_report
    from s3ray.pipeline.rundir import RunDir

    path = Path(args.run_dir)
    manifest = json.loads((path / "manifest.json").read_text())
    write_report(RunDir(path, manifest["config"], resume=True))
    print(f"wrote {path / 'report.md'}")
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
    r.add_argument("--resume", action="store_true",
                   help="continue the run in run.output_dir from its last finished step (no regeneration)")
    r.add_argument("--stop-after", metavar="STEP",
                   help="pause after this step (a manifest step name, e.g. round0/train); --resume continues")
    r.set_defaults(fn=_cmd_run)

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
    s.set_defaults(fn=_cmd_serve)

    rep = sub.add_parser("report", help="rebuild the report (Markdown, JSON, PNG) of a run directory")
    rep.add_argument("run_dir", help="a run's run.output_dir (holds manifest.json), e.g. runs/sst2-quickstart")
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

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, DataError, ModelNotFound, RunDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished steps are kept; continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
