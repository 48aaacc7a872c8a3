"""Entry point for `ray job submit`: fine-tune the teacher (then annotate or generate) on the cluster.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/finetune_job.py configs/finetune/neox20b-zero3-8gpu.yaml --set model.path=/models/neox20b

Inside a Ray job `ray.address` defaults to "auto" (the job's own cluster). A resubmitted job resumes its run
directory: finished steps are skipped and the fine-tune continues from its last Ray Train checkpoint.
"""

from __future__ import annotations

import os
import sys

from s3ray.cli import main

if __name__ == "__main__":
    argv = ["finetune", *sys.argv[1:]]
    in_job = os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID")
    if in_job and not any(a.startswith("ray.address=") for a in argv):
        argv += ["--set", "ray.address=auto"]
    if "--resume" not in argv and "--plan" not in argv:
        argv.append("--resume")
    sys.exit(main(argv))
