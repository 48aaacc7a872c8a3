"""Process-wide setup: the local Ray cluster's workers and core counts."""

import json
import logging
from pathlib import Path

import pytest

from s3ray.runtime import _STATE_API_LOGGERS, cap_to_local_cores, local_cores, one_node


def test_workers_of_a_local_cluster_do_not_poll_warnings_about_the_missing_state_api(ray_local):
    """A local cluster has no dashboard, so Ray Train's placement-group cleaner would warn once a second for a
    whole training run; the worker setup hook raises that logger to ERROR in every worker."""

    @ray_local.remote(num_cpus=0)
    def levels() -> list[int]:
        return [logging.getLogger(name).getEffectiveLevel() for name in _STATE_API_LOGGERS]

    assert ray_local.get(levels.remote()) == [logging.ERROR] * len(_STATE_API_LOGGERS)


def test_a_one_node_cluster_caps_threads_at_the_real_cores(ray_local):
    assert one_node()
    assert cap_to_local_cores(10_000) == local_cores() >= 1
    assert cap_to_local_cores(1) == 1


def test_the_submitted_runtime_env_wins_over_the_drivers_copied_variables(monkeypatch):
    """`ray job submit --runtime-env-json` may set a variable init_ray also copies from the driver; ray.init
    refuses such a pair, so the driver's side drops what the job sets and Ray's own merge keeps the user's."""
    import json

    from ray.runtime_env.runtime_env import _merge_runtime_env

    from s3ray.runtime import submitted_runtime_env, without_job_conflicts

    job = {"env_vars": {"HF_HUB_OFFLINE": "0", "USER_ONLY": "1"}, "worker_process_setup_hook": "user.hook",
           "working_dir": "."}
    ours = {"env_vars": {"HF_HUB_OFFLINE": "1", "S3RAY_CACHE": "/c"},
            "worker_process_setup_hook": "s3ray.runtime.quiet_state_api_warnings"}
    assert _merge_runtime_env(job, ours) is None  # what ray.init would raise on
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": job}))
    driver = without_job_conflicts(ours, submitted_runtime_env())
    merged = _merge_runtime_env(job, driver)
    assert merged is not None
    assert merged["env_vars"] == {"HF_HUB_OFFLINE": "0", "USER_ONLY": "1", "S3RAY_CACHE": "/c"}
    assert merged["worker_process_setup_hook"] == "user.hook" and merged["working_dir"] == "."
    assert ours["env_vars"]["HF_HUB_OFFLINE"] == "1"  # the caller's dict is not changed
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert without_job_conflicts(ours, submitted_runtime_env()) == ours


def test_a_joined_cluster_gets_no_driver_cache_paths(monkeypatch):
    """Cache folders are paths on the driver's disk: a cluster the driver starts (one machine) shares them,
    but on a cluster it joins every node keeps its own, so a replica on another node never writes under
    the head's home."""
    from s3ray.runtime import job_env_vars

    monkeypatch.setenv("S3RAY_CACHE", "/head/cache")
    monkeypatch.setenv("VLLM_CACHE_ROOT", "/head/vllm")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    joined = job_env_vars(joining=True)
    assert "S3RAY_CACHE" not in joined and "VLLM_CACHE_ROOT" not in joined
    assert joined["HF_HUB_OFFLINE"] == "1" and joined["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    started = job_env_vars(joining=False)
    assert started["S3RAY_CACHE"] == "/head/cache" and started["VLLM_CACHE_ROOT"] == "/head/vllm"


def test_node_resources_report_what_is_free_on_each_node(ray_local):
    import time

    from s3ray.runtime import node_resources

    (idle,) = node_resources()
    assert idle.total["CPU"] == 4 and idle.free["CPU"] <= 4
    group = ray_local.util.placement_group([{"CPU": 1}])
    ray_local.get(group.ready())
    try:
        deadline = time.monotonic() + 10  # free resources reach the GCS a moment after they are taken
        while node_resources()[0].free["CPU"] != idle.free["CPU"] - 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert node_resources()[0].free["CPU"] == idle.free["CPU"] - 1
    finally:
        ray_local.util.remove_placement_group(group)


def test_code_that_starts_a_local_cluster_joins_the_job_s_cluster_inside_a_ray_job(monkeypatch):
    from s3ray.runtime import cluster_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address(None) is None and cluster_address("10.0.0.1:6379") == "10.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # what `ray job submit` gives its entrypoint
    assert cluster_address(None) == "127.0.0.1:6379"


def test_the_benchmark_job_runs_a_benchmark_and_keeps_its_json_where_asked(tmp_path, monkeypatch, capsys):
    """jobs/benchmark_job.py: the benchmark's own arguments pass through, its JSON reaches the log and the
    --results folder (the job's working dir is temporary), and a failed benchmark fails the job."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    import benchmark_job

    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "echo.py").write_text(
        "import json, sys\nargs = sys.argv[1:]\nout = args[args.index('--out') + 1]\n"
        "json.dump({'args': args[: args.index('--out')]}, open(out, 'w'))\n")
    (bench / "broken.py").write_text("raise SystemExit(3)\n")
    monkeypatch.setattr(benchmark_job, "BENCHMARKS", bench)
    assert benchmark_job.names() == ["broken", "echo"]
    assert benchmark_job.run_job(["echo", "--results", str(tmp_path / "res"), "--", "--rows", "5"]) == 0
    assert json.loads((tmp_path / "res" / "echo.json").read_text()) == {"args": ["--rows", "5"]}
    assert '"args"' in capsys.readouterr().out
    assert benchmark_job.run_job(["broken"]) == 3
    with pytest.raises(SystemExit):
        benchmark_job.parse(["nosuch"])
