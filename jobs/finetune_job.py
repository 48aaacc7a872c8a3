"""Entry point for `ray job submit`: fine-tune the teacher (then annotate or generate) on the cluster.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/finetune_job.py configs/finetune/neox20b-zero3-8gpu.yaml --set model.path=/models/neox20b

Inside a Ray job `ray.address` defaults to "auto" (the job's own cluster). A resubmitted job resumes its run
directory: finished steps are skipped and the fine-tune continues from its last Ray Train checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

from s3ray.cli import main
from s3ray.finetune.config import load_finetune_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from s3_job import checked_config, in_ray_job  # the sibling job script, not a package


def run_job(argv: list[str]) -> int:
    in_job = in_ray_job()
    argv = ["finetune", *argv]
    if in_job and not any(a.startswith("ray.address=") for a in argv):
        argv += ["--set", "ray.address=auto"]
    if "--resume" not in argv and "--plan" not in argv:
        argv.append("--resume")  # the recipe starts the run when there is none yet
    if checked_config(argv, in_job, load_finetune_config) is None:  # run storage the job would lose, or some node cannot see
        return 2
    return main(argv)


if __name__ == "__main__":
    sys.exit(run_job(sys.argv[1:]))
