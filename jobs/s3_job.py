"""Entry point for `ray job submit`: run an S3 config on the cluster the job was submitted to.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/s3_job.py configs/sst2_quickstart.yaml --set teacher.replicas=4

Inside a Ray job, `ray.address` defaults to "auto" (the job's own cluster) unless the config sets it.
Everything else is `s3ray run`: same config, same --resume semantics, same report.
"""

from __future__ import annotations

import os
import sys

from s3ray.cli import main

if __name__ == "__main__":
    argv = ["run", *sys.argv[1:]]
    # A submitted job runs on a node of the cluster: join it instead of starting a new local one.
    in_job = os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID")
    if in_job and not any(a.startswith("ray.address=") for a in argv):
        argv += ["--set", "ray.address=auto"]
    if "--resume" not in argv and "--resume-if-exists" not in argv:
        argv.append("--resume-if-exists")  # a resubmitted job continues its run directory
    sys.exit(main(argv))
