"""Entry point for `ray job submit`: generate a corpus (`s3ray generate`) on the cluster the job was submitted to.

    ray job submit --address http://HEAD:8265 --runtime-env jobs/runtime_env.yaml -- \
        python jobs/generate_job.py configs/gpu_cluster.yaml --rows 1000000 --set teacher.replicas=8

As jobs/s3_job.py: inside a job `ray.address` defaults to "auto", run storage is checked first (absolute,
visible from every node), and a resubmitted job continues the corpus it finds (--resume when one exists).
"""

from __future__ import annotations

import sys
from pathlib import Path

from s3ray import storage
from s3ray.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from s3_job import checked_config, in_ray_job  # the sibling job script, not a package


def job_argv(argv: list[str], in_job: bool, corpus_exists) -> list[str]:
    """`s3ray generate` arguments: join the job's cluster; continue a corpus that is already there."""
    argv = ["generate", *argv]
    if in_job and not any(a.startswith("ray.address=") for a in argv):
        argv += ["--set", "ray.address=auto"]
    if "--resume" not in argv and corpus_exists():
        argv.append("--resume")
    return argv


def run_job(argv: list[str]) -> int:
    in_job = in_ray_job()
    cfg = checked_config(["generate", *argv], in_job)
    if cfg is None:
        return 2
    root = storage.absolute_output_dir(cfg.run.output_dir)  # a path, or an object store URI
    rc = main(job_argv(argv, in_job, lambda: storage.exists(storage.join(root, "corpus_state/state.json"))))
    out = storage.join(root, "corpus")
    if rc == 0:
        print(f"s3ray generate job done; corpus: {out} (card: {storage.join(root, 'corpus_card.json')})")
    else:
        print(f"s3ray generate job failed (exit {rc}); finished shards are kept in {out}: resubmit to continue",
              file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(run_job(sys.argv[1:]))
