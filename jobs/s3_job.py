"""Entry point for `ray job submit`: run an S3 config on the cluster the job was submitted to.

    ray job submit --address http://HEAD:8265 --runtime-env jobs/runtime_env.yaml -- \
        python jobs/s3_job.py configs/gpu_cluster.yaml --set teacher.replicas=4

Inside a Ray job, `ray.address` defaults to "auto" (the job's own cluster) unless the config sets it.
Before anything expensive the job checks its run storage: a relative run.output_dir would land in the
temporary copy of the working dir that Ray deletes when the job ends, and on a cluster of several nodes every
node must see run.output_dir. Everything else is `s3ray run`: same config, same --resume semantics, same
report (a config with run.seeds runs the sweep, its seeds side by side where the cluster has room); the
job's last line says where the report is.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from s3ray import storage
from s3ray.cli import build_parser, main
from s3ray.config import ConfigError, load_config


def job_argv(argv: list[str], in_job: bool) -> list[str]:
    """`s3ray run` arguments for this job: join the job's cluster, and continue an existing run directory."""
    argv = ["run", *argv]
    if in_job and not any(a.startswith("ray.address=") for a in argv):
        argv += ["--set", "ray.address=auto"]
    if "--resume" not in argv and "--resume-if-exists" not in argv:
        argv.append("--resume-if-exists")  # a resubmitted job continues its run directory
    return argv


def check_run_storage(output_dir: str, address: str | None, in_job: bool) -> None:
    """Refuse run storage the job would lose or that some node cannot reach (ConfigError / StorageError)."""
    if in_job and storage.is_local(output_dir) and not Path(output_dir).expanduser().is_absolute():
        raise ConfigError(
            f"run.output_dir {output_dir!r} is relative: in a Ray job it would land in the temporary copy of the "
            "working dir that Ray deletes when the job ends. Set an absolute path on a shared filesystem or an "
            "object store URI, e.g. --set run.output_dir=s3://BUCKET/runs/NAME"
        )
    if address:
        from s3ray.runtime import alive_nodes, init_ray

        init_ray(address=address)  # the run joins the same cluster later (init_ray is idempotent)
        if len(alive_nodes()) > 1:  # as written: `~` is each node's own home, as a node-local path is
            storage.check_visible_from_all_nodes(output_dir)


def in_ray_job() -> bool:
    return bool(os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"))


def checked_config(cli_argv: list[str], in_job: bool, load=load_config):
    """The job's config (read by `load`) once its run storage passed `check_run_storage`; None (the error
    printed) if not."""
    args = build_parser().parse_args(cli_argv)
    try:
        cfg = load(args.config, args.overrides)
        check_run_storage(cfg.run.output_dir, cfg.ray.address, in_job)
    except (ConfigError, storage.StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    return cfg


def run_job(argv: list[str]) -> int:
    in_job = in_ray_job()
    argv = job_argv(argv, in_job)
    cfg = checked_config(argv, in_job)
    if cfg is None:
        return 2
    rc = main(argv)
    out = storage.absolute_output_dir(cfg.run.output_dir)
    if rc == 0:
        if cfg.run.seeds:  # run.seeds: the job was a sweep (one run per seed in seed<N>/)
            print(f"s3ray job done; sweep report: {storage.join(out, 'sweep_report.md')} (JSON: sweep_report.json)")
        else:
            print(f"s3ray job done; report: {storage.join(out, 'report.md')} (JSON: report.json, plot: report.png)")
    else:
        print(f"s3ray job failed (exit {rc}); finished steps are kept in {out}: resubmit to continue", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(run_job(sys.argv[1:]))
