"""A whole S3 run on a local multi-node Ray cluster, submitted with `ray job submit` (issue 11).

One cluster for the module (tests/multinode.py): a head with no CPUs that serves the job API, a teacher node,
a student node and a spare teacher node, each with its own HOME and caches, plus a moto S3 server. Custom
resources pin the teacher replica to a `teacher_node` and the student's workers and mining actors to the
`student_node`; `run.output_dir` is an s3:// bucket; the tiny teacher and student are local folders on the
driver's machine only, so they reach the other nodes through the run storage. The scenario, run once:

1. the same run with a node-local output_dir fails before generation, naming the storage problem;
2. job A: generation starts; the node holding the teacher replica is killed (the replica comes back on the
   spare teacher node); after seed synthesis the job is stopped (`ray job stop`);
3. the head's local copy of the run is deleted (a resubmitted job landing on another head), and job B, the
   same submission again, resumes from S3 and finishes: nothing job A generated is generated again, and
   the report (read from S3) has every student and every row exactly once;
4. job G generates a small corpus into S3 with jobs/generate_job.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from s3ray import storage

REPO = Path(__file__).resolve().parents[1]
RUN_URI = "s3://s3ray-runs/e2e"
CORPUS_URI = "s3://s3ray-runs/corpus"
pytestmark = [pytest.mark.slow, pytest.mark.multinode]  # in the default suite; alone: make multinode


def _common(name: str, output_dir: str, seed: int, teacher: Path, **teacher_settings) -> dict:
    """Task, data and a tiny teacher pinned to a `teacher_node`: what the run and the corpus job share."""
    return {
        "run": {"name": name, "output_dir": output_dir, "seed": seed},
        "task": {"type": "classification", "labels": ["negative", "positive"], "description": "movie review"},
        "data": {"validation": str(REPO / "data/sst2/validation.jsonl"), "validation_size": 24},
        "teacher": {"model": str(teacher), "engine": "transformers", "resources": {"teacher_node": 1},
                    "request_timeout_s": 120, "start_timeout_s": 240, **teacher_settings},
    }


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(json.dumps(cfg))  # YAML is a superset of JSON
    return path


def _config(path: Path, output_dir: str, teacher: Path, student: Path) -> Path:
    cfg = _common("multinode", output_dir, 3, teacher, transformers={"batch_size": 1}, max_in_flight=2,
                  sampling={"max_tokens": 16})
    cfg.update({
        "synthesis": {"num_rationales": 2, "rationales_per_example": 1, "seed_examples": 60, "rounds": 1,
                      "min_chars": 4},
        "student": {"model": str(student), "epochs": 1, "batch_size": 8, "max_length": 32,
                    "resources": {"student_node": 0.01}, "cpus_per_worker": 1},
        "mining": {"batch_size": 8, "concurrency": 1},
        "baselines": {"equal_budget": False, "real_validation": False, "s3_plus_real": False},
    })
    return _write(path, cfg)


def _corpus_config(path: Path, teacher: Path) -> Path:
    """A small corpus into S3: 3 shards, so the corpus-wide dedup pass reads shards written by the driver."""
    cfg = _common("corpus", CORPUS_URI, 4, teacher, transformers={"batch_size": 8}, max_in_flight=8,
                  sampling={"max_tokens": 8})
    cfg["synthesis"] = {"num_rationales": 2, "rationales_per_example": 1, "corpus_rows": 150,
                        "corpus_shard_size": 64, "min_chars": 1}
    return _write(path, cfg)


class Jobs:
    """`ray job ...` against the test cluster's head, from the driver machine "d"."""

    def __init__(self, cluster, call_log: Path):
        self.cluster, self.env = cluster, cluster.node_env("d")
        self.runtime_env = json.dumps({"env_vars": {
            "S3RAY_ENGINE_CALL_LOG": str(call_log), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "DS_ACCELERATOR": "cpu", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}})

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        ray_cli = str(Path(sys.executable).with_name("ray"))
        return subprocess.run([ray_cli, "job", args[0], "--address", self.cluster.dashboard, *args[1:]], env=self.env,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def submit(self, job_id: str, config: Path, script: str = "jobs/s3_job.py") -> None:
        done = self.ray("submit", "--no-wait", "--submission-id", job_id, "--runtime-env-json", self.runtime_env,
                        "--", sys.executable, str(REPO / script), str(config))
        assert done.returncode == 0, done.stdout + done.stderr

    def status(self, job_id: str) -> str:
        done = self.ray("status", job_id)
        said = done.stdout + done.stderr  # the CLI logs to stderr; an ended job gets a sentence of its own
        for state, words in (("SUCCEEDED", "succeeded"), ("FAILED", "failed"), ("STOPPED", "was stopped")):
            if f"Job '{job_id}' {words}" in said:
                return state
        found = re.search(r"Status for job '[^']+': (\w+)", said)
        return found.group(1) if found else "UNKNOWN"

    def logs(self, job_id: str) -> str:
        return self.ray("logs", job_id).stdout

    def wait(self, job_id: str, timeout_s: float, until=None, until_every_s: float = 5.0) -> str:
        """Poll until the job ends (or `until()` holds, checked every `until_every_s`); the final state ('' when
        `until` held). The job's state (a CLI call, seconds on a loaded machine) is asked every 5 s at most."""
        deadline, next_status = time.monotonic() + timeout_s, 0.0
        while time.monotonic() < deadline:
            if until is not None and until():
                return ""
            if time.monotonic() >= next_status:
                state = self.status(job_id)
                if state in ("SUCCEEDED", "FAILED", "STOPPED"):
                    return state
                next_status = time.monotonic() + 5
            time.sleep(until_every_s if until is not None else 5)
        raise TimeoutError(f"job {job_id} still {self.status(job_id)} after {timeout_s:.0f} s:\n"
                           f"{self.logs(job_id)[-4000:]}")


def _calls(call_log: Path) -> list[tuple[str, int]]:
    if not call_log.exists():
        return []
    lines = call_log.read_text().splitlines()
    return [(rid, int(pid)) for rid, pid in (line.split("\t") for line in lines if "\t" in line)]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    from fixtures_student import build_tiny_student
    from fixtures_teacher import build_tiny_teacher
    from multinode import S3_CREDENTIALS, start_cluster

    work = tmp_path_factory.mktemp("mn")
    teacher, student = build_tiny_teacher(work / "teacher"), build_tiny_student(work / "student")
    cluster = start_cluster(worker_cpus=2, dashboard=True, spare_teacher=True)
    out: dict = {"cluster": cluster}
    saved = {k: os.environ.get(k) for k in (*S3_CREDENTIALS, "S3RAY_S3_ENDPOINT")}
    os.environ.update(S3_CREDENTIALS, S3RAY_S3_ENDPOINT=cluster.s3_endpoint)  # to read the run from here
    try:
        call_log = cluster.root / "calls.log"
        jobs = Jobs(cluster, call_log)
        local_dir = "~/runs/e2e"  # each node's own home (all "nodes" share one real disk here)
        jobs.submit("local", _config(work / "local.json", local_dir, teacher, student))
        out["local_state"], out["local_logs"] = jobs.wait("local", 400), jobs.logs("local")
        out["local_calls"] = len(_calls(call_log))

        cfg = _config(work / "s3.json", RUN_URI, teacher, student)
        jobs.submit("a", cfg)
        # The kill must land mid-generation: the call log is read every 0.2 s (generation takes seconds).
        jobs.wait("a", 600, until=lambda: len(_calls(call_log)) >= 2, until_every_s=0.2)
        first = _calls(call_log)[0][1]
        out["replica_node_before"] = cluster.node_of(first)
        cluster.kill_node(out["replica_node_before"])
        state = jobs.wait("a", 900, until=lambda: "== round0/train" in jobs.logs("a"))
        out["a_state_before_stop"] = state
        # Where each replica ran, while it still runs (the pool stays up while the student trains).
        out["pid_nodes"] = {pid: cluster.node_of(pid) for _, pid in _calls(call_log)}
        jobs.ray("stop", "a", timeout=60)
        out["a_state"] = jobs.wait("a", 60)
        out["a_logs"] = jobs.logs("a")
        out["a_calls"] = _calls(call_log)

        shutil.rmtree(cluster.root / "h" / "s3ray" / "runs", ignore_errors=True)  # "another head"
        jobs.submit("b", cfg)
        out["b_state"] = jobs.wait("b", 1200)
        out["b_logs"] = jobs.logs("b")
        out["b_calls"] = _calls(call_log)[len(out["a_calls"]):]
        corpus = _corpus_config(work / "corpus.json", teacher)
        jobs.submit("g", corpus, script="jobs/generate_job.py")
        out["g_state"], out["g_logs"] = jobs.wait("g", 600), jobs.logs("g")
        if out["g_state"] == "SUCCEEDED":
            out["corpus_card"] = json.loads(storage.read_bytes(storage.join(CORPUS_URI, "corpus_card.json")))
            out["corpus_files"] = storage.list_dir(CORPUS_URI, recursive=True)
        if out["b_state"] == "SUCCEEDED":
            out["report"] = json.loads(storage.read_bytes(storage.join(RUN_URI, "report.json")))
            out["manifest"] = json.loads(storage.read_bytes(storage.join(RUN_URI, "manifest.json")))
            out["final"] = storage.read_parquet(storage.join(RUN_URI, "final/train.parquet"))
            out["s3_files"] = storage.list_dir(RUN_URI, recursive=True)
        # Which nodes downloaded a staged model into their *own* cache (each node's S3RAY_CACHE).
        out["staged_on"] = {n for n in ("h", "t", "t2", "s") if any((cluster.root / n / "s3ray" / "staged").glob("*"))}
        yield out
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        cluster.stop()


def test_a_node_local_output_dir_fails_before_generation(scenario):
    assert scenario["local_state"] == "FAILED", scenario["local_logs"][-3000:]
    assert "is not the same storage on every Ray node; 3 of 4 node(s)" in scenario["local_logs"]
    assert "s3://" in scenario["local_logs"]
    assert scenario["local_calls"] == 0


def test_a_killed_teacher_node_s_replica_comes_back_on_the_spare_node(scenario):
    before = scenario["replica_node_before"]
    assert before in ("t", "t2")
    spare = "t2" if before == "t" else "t"
    pids_on = {node for node in scenario["pid_nodes"].values() if node}
    assert spare in pids_on, (scenario["pid_nodes"], scenario["a_logs"][-3000:])
    assert scenario["a_state_before_stop"] == "", scenario["a_logs"][-3000:]  # it went on to train


def test_the_stopped_job_resubmitted_resumes_from_s3_and_regenerates_nothing(scenario):
    assert scenario["a_state"] == "STOPPED"
    assert scenario["b_state"] == "SUCCEEDED", scenario["b_logs"][-5000:]
    done_in_a = {rid for rid, _ in scenario["a_calls"]}
    again = [rid for rid, _ in scenario["b_calls"] if rid in done_in_a]
    assert again == [], f"{len(again)} calls of job A were generated again"
    assert "[resume] round0/synthesis already done" in scenario["b_logs"]
    assert "teacher cache: restored from" in scenario["b_logs"]
    assert "report: s3://s3ray-runs/e2e/report.md" in scenario["b_logs"]


def test_the_report_read_from_s3_has_every_student_and_every_row_once(scenario):
    assert scenario.get("report"), scenario["b_logs"][-3000:]
    steps = scenario["manifest"]["steps"]
    assert {"round0/train", "round1/train", "round0/mine", "round0/synthesis", "round1/synthesis"} <= set(steps)
    final: pa.Table = scenario["final"]
    seed_rows = steps["round0/synthesis"]["result"]["rows"]
    kept = seed_rows + steps["round1/synthesis"]["result"]["rows"]
    assert final.num_rows == kept > 0
    rows = {row["method"]: row for row in scenario["report"]["comparison"]}
    assert rows["seed only (round 0, ZeroGen-style)"]["train_rows"] == seed_rows
    assert rows["S3 after 1 round(s)"]["train_rows"] == kept
    ids = final["id"].to_pylist()
    assert len(set(ids)) == len(ids)
    files = scenario["s3_files"]
    assert "students/round1/checkpoint/s3ray_student.json" in files
    assert any(f.startswith("models/") for f in files) and "teacher_cache.sqlite" in files
    assert not [f for f in files if "/ray_train/" in f]  # Ray Train's second copy of each checkpoint is dropped
    assert not [f for f in files if f.startswith(".s3ray-visibility/")]  # the storage check's markers are removed


def test_each_node_stages_the_models_in_its_own_cache(scenario):
    """The teacher and student nodes each downloaded the staged models into their own cache folder, not into
    the driver's (the head's), whose path another machine may not have."""
    staged = scenario["staged_on"]
    assert "s" in staged and staged & {"t", "t2"}, staged


def test_a_corpus_generated_into_s3_by_a_job_is_whole_there(scenario):
    """`jobs/generate_job.py` with an s3:// output_dir: shards, state and card land in S3, and the corpus-wide
    dedup pass (Ray Data tasks on the worker nodes; the head runs no tasks) read the shards from there."""
    assert scenario["g_state"] == "SUCCEEDED", scenario["g_logs"][-4000:]
    card, files = scenario["corpus_card"], scenario["corpus_files"]
    assert card["rows"] == 150 and card["shards"] >= 3
    assert {f"corpus/{name}" for name in card["files"]} <= set(files)
    assert "corpus_state/state.json" in files and "teacher_cache.sqlite" in files
    assert "corpus-wide dedup pass" in scenario["g_logs"]


def test_nothing_is_left_running(scenario):
    cluster = scenario["cluster"]
    cluster.stop()
    assert cluster.processes() == []
