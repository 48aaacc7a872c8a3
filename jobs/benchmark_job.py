"""Entry point for `ray job submit`: run one of benchmarks/*.py on the cluster the job was submitted to.

    ray job submit --address http://HEAD:8265 --runtime-env jobs/runtime_env.yaml -- \
        python jobs/benchmark_job.py teacher_throughput --results s3://BUCKET/bench -- --model Qwen/Qwen2.5-7B-Instruct

Arguments after `--` go to the benchmark. It joins the job's cluster ($RAY_ADDRESS, which `ray job submit`
sets) instead of starting a local one. Its JSON is printed to the job's log and, with --results (an object
store URI or an absolute path on shared storage), copied there: the job's working dir is deleted when it ends.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from s3ray import storage

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def names() -> list[str]:
    return sorted(p.stem for p in BENCHMARKS.glob("*.py"))


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(this job's options, the benchmark's own arguments: those after `--`)."""
    ours, rest = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(prog="benchmark_job.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("benchmark", choices=names(), help="a file of benchmarks/, without .py")
    ap.add_argument("--results", help="folder (object store URI or shared path) to copy the JSON result to")
    return ap.parse_args(ours), rest


def benchmark_command(name: str, rest: list[str], out: Path) -> list[str]:
    return [sys.executable, str(BENCHMARKS / f"{name}.py"), *rest, "--out", str(out)]


def run_job(argv: list[str]) -> int:
    args, rest = parse(argv)
    out = Path(tempfile.mkdtemp(prefix="s3ray-bench-")) / f"{args.benchmark}.json"
    rc = subprocess.call(benchmark_command(args.benchmark, rest, out))
    if rc != 0 or not out.is_file():
        print(f"benchmark {args.benchmark} failed (exit {rc})", file=sys.stderr)
        return rc or 1
    print(out.read_text())
    if args.results:
        dest = storage.join(storage.absolute_output_dir(args.results), out.name)
        storage.upload(out, dest)
        print(f"benchmark result: {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(sys.argv[1:]))
