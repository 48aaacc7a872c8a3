"""Crash-point fuzzing of `s3ray run --resume-if-exists` (issue 10): helpers for tests/test_fault_fuzz.py.

Each attempt is a real CLI driver in its own process group, tagged with an environment marker that every
process it starts (Ray's GCS, raylet, workers, agents) inherits, so the test finds them without going by name.
The schedule: the driver's output names each step as it starts ("== <step>"); for a phase (start-up, then each
step) with kills left in its budget, the driver is SIGKILLed, whole group, at a random moment within that
phase's duration in an uninterrupted reference run. A phase's budget is finite, so every phase eventually runs
through: progress is guaranteed and the number of attempts bounded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
MARK = "S3RAY_FUZZ_MARK"
CALL_LOG = "S3RAY_ENGINE_CALL_LOG"
STARTUP = "start-up"


def write_config(path: Path, out_dir: Path, teacher: Path, student: Path) -> Path:
    """A tiny 2-round run with every baseline on: every step kind runs, each cheaply."""
    cfg = {
        "run": {"name": "fuzz", "output_dir": str(out_dir), "seed": 5},
        "task": {"type": "classification", "labels": ["negative", "positive"], "description": "movie review"},
        "data": {"validation": str(REPO / "data/sst2/validation.jsonl"), "test": str(REPO / "data/sst2/test.jsonl"),
                 "validation_size": 24, "test_size": 16},
        # batch_size 1: the transformers engine seeds each batch from its members, so one request per batch
        # makes a request's text independent of which other requests a resumed attempt still had to send.
        "teacher": {"model": str(teacher), "engine": "transformers", "transformers": {"batch_size": 1},
                    "max_in_flight": 4, "sampling": {"max_tokens": 16}},
        "synthesis": {"num_rationales": 2, "rationales_per_example": 1, "seed_examples": 8, "rounds": 2,
                      "min_chars": 4},
        "student": {"model": str(student), "epochs": 1, "batch_size": 8, "max_length": 32},
        "mining": {"batch_size": 8},
        "ray": {"num_cpus": 4},
    }
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def driver_env(work: Path, tag: str) -> dict:
    ray_dir = Path(tempfile.gettempdir()) / f"s3fz-{hashlib.sha1(str(work).encode()).hexdigest()[:10]}"
    ray_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update({
        MARK: tag, CALL_LOG: str(work / "calls.log"), "PYTHONPATH": str(REPO),
        # Every attempt's Ray session lives under one short folder in the system temp dir: Ray's socket paths
        # must stay under 107 bytes, which a deep pytest tmp_path (pytest-94/fz0/fuzz/...) already breaks.
        "RAY_TMPDIR": str(ray_dir), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "DS_ACCELERATOR": "cpu", "S3RAY_CACHE": str(work / "cache"), "PYTHONUNBUFFERED": "1",
        "TQDM_DISABLE": "1",
    })
    return env


def start_driver(config: Path, env: dict, log_path: Path) -> subprocess.Popen:
    with open(log_path, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "s3ray.cli", "run", str(config), "--resume-if-exists"],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def marked_pids(prefix: str) -> dict[int, str]:
    """Live processes whose environment holds MARK=<prefix...>, with their command lines."""
    found = {}
    needle = f"{MARK}={prefix}".encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            environ = (d / "environ").read_bytes()
            if any(v.startswith(needle) for v in environ.split(b"\0")):
                state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
        except (OSError, IndexError):
            continue
    return found


def cached_ids(run_dir: Path) -> set[str]:
    """Request ids in the generation cache now (read-only; no driver is running)."""
    path = run_dir / "teacher_cache.sqlite"
    if not path.exists():
        return set()
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {r[0] for r in db.execute("SELECT request_id FROM generations")}
    except sqlite3.OperationalError:  # killed before the table was created
        return set()
    finally:
        db.close()


def read_calls(path: Path, offset: int = 0) -> tuple[list[str], int]:
    """Request ids logged by engines from byte `offset` on (whole lines only), and the new offset."""
    if not path.exists():
        return [], offset
    data = path.read_bytes()[offset:]
    end = data.rfind(b"\n") + 1
    return [line.split("\t")[0] for line in data[:end].decode().splitlines()], offset + end


def step_starts(log_text: str) -> list[str]:
    return [line.split(" == ", 1)[1].strip() for line in log_text.splitlines() if " INFO s3ray: == " in line]


def run_reference(config: Path, env: dict, log_path: Path, timeout: float) -> dict[str, float]:
    """One uninterrupted run; returns each phase's duration (start-up, then every step in order)."""
    t0 = time.monotonic()
    proc = start_driver(config, env, log_path)
    seen: dict[str, float] = {}
    while proc.poll() is None:
        for name in step_starts(log_path.read_text(errors="replace")):
            seen.setdefault(name, time.monotonic() - t0)
        if time.monotonic() - t0 > timeout:
            kill_group(proc)
            raise AssertionError(f"the reference run took over {timeout:.0f} s; see {log_path}")
        time.sleep(0.2)
    assert proc.returncode == 0, log_path.read_text(errors="replace")[-3000:]
    for name in step_starts(log_path.read_text(errors="replace")):
        seen.setdefault(name, time.monotonic() - t0)
    names = list(seen)
    ends = [seen[n] for n in names[1:]] + [time.monotonic() - t0]
    return {STARTUP: seen[names[0]], **{n: end - seen[n] for n, end in zip(names, ends)}}


# Ray's own message when its node does not come up in time (seen at load average 60 on 2 cores).
RAY_START_TIMEOUT = "The current node timed out during startup"
MAX_START_TIMEOUTS = 3


@dataclass
class Kill:
    attempt: int
    phase: str  # what was running at the kill moment
    delay: float  # seconds into that phase
    cached_before: int  # cache size when the attempt started


@dataclass
class FuzzResult:
    seed: int
    kills: list[Kill]
    attempts: int
    seconds: float
    calls: list[str]  # every request id an engine finished, over all attempts, in order
    # attempt -> ids its engines generated although they were in the cache when it started (must be empty)
    regenerated: dict[int, list[str]] = field(default_factory=dict)
    start_timeouts: list[int] = field(default_factory=list)  # attempts whose Ray node timed out starting


def fuzz(config: Path, run_dir: Path, work: Path, durations: dict[str, float], seed: int, min_kills: int,
         max_seconds: float, tag: str) -> FuzzResult:
    """Kill and resume the run until it finishes; at least `min_kills` kills spread over its phases."""
    rng = random.Random(seed)
    phases = list(durations)
    used = dict.fromkeys(phases, 0)
    fastest = dict(durations)
    # Aim past the minimum: a kill planned late in a phase misses when the phase ends first, and a miss in
    # the last phase ends the run (29 kills once).
    target = min_kills + 4
    speed: list[float] = []  # observed / reference duration of each phase that ran through
    quotas: dict[str, int] = {}
    kills: list[Kill] = []
    start_timeouts: list[int] = []
    calls_path, offset, calls, regenerated = work / "calls.log", 0, [], {}
    t_start = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        before = cached_ids(run_dir)
        env = driver_env(work, f"{tag}-{attempt}")
        log_path = work / f"attempt{attempt:03d}.log"
        t0 = time.monotonic()
        proc = start_driver(config, env, log_path)
        phase, n_seen = STARTUP, 0

        def plan(name: str, since: float):
            left = phases[phases.index(name):] if name in phases else [name]
            # The kills still owed, spread over the phases ahead; every phase gets one, none more than 8.
            # Fixed when the phase is first seen (kills it takes must not shrink its own share).
            quota = quotas.setdefault(name, max(1, min(8, math.ceil((target - len(kills)) / len(left)))))
            if used.get(name, 0) >= quota or time.monotonic() - t_start > max_seconds:
                return None
            # Within the phase's shortest duration seen so far (a less loaded machine runs faster than the
            # reference did), early enough that most kills land inside it.
            # A phase runs through only once (then it is skipped), so its reference duration is scaled by how much
            # faster than the reference this machine now runs (load falls as other jobs end): the median of
            # observed / reference over the phases that ran through, at most 1.
            scale = min(1.0, statistics.median(speed)) if speed else 1.0
            return since + rng.uniform(0.02, 0.6) * fastest.get(name, 5.0) * scale

        phase_t0 = t0
        kill_at = plan(phase, phase_t0)
        while proc.poll() is None:
            started = step_starts(log_path.read_text(errors="replace"))
            if len(started) > n_seen:
                now = time.monotonic()
                took = now - phase_t0  # it ran through
                if phase in durations and durations[phase] > 5.0:  # long enough to say something about speed
                    speed.append(took / durations[phase])
                fastest[phase] = min(fastest.get(phase, math.inf), took)
                n_seen, phase, phase_t0 = len(started), started[-1], now
                kill_at = plan(phase, phase_t0)
            if kill_at is not None and time.monotonic() >= kill_at:
                kill_group(proc)
                used[phase] = used.get(phase, 0) + 1
                kills.append(Kill(attempt, phase, round(time.monotonic() - phase_t0, 2), len(before)))
                break
            time.sleep(0.05)
        new, offset = read_calls(calls_path, offset)
        calls += new
        regenerated[attempt] = sorted(set(new) & before)
        if not (kills and kills[-1].attempt == attempt):  # ran to its end
            text = log_path.read_text(errors="replace")
            if proc.returncode != 0 and RAY_START_TIMEOUT in text and len(start_timeouts) < MAX_START_TIMEOUTS:
                # Ray itself gave up starting on an overloaded machine, before s3ray did anything: what a user
                # does then (run it again) is one more resume, which must hold the same guarantees.
                start_timeouts.append(attempt)
                continue
            assert proc.returncode == 0, f"attempt {attempt} failed: " + text[-4000:]
            break
    return FuzzResult(seed, kills, attempt, time.monotonic() - t_start, calls, regenerated, start_timeouts)


def wait_gone(prefix: str, timeout: float) -> dict[int, str]:
    """Poll until no process carries the marker `prefix`, or `timeout` passes; returns what is left."""
    deadline = time.monotonic() + timeout
    while True:
        left = marked_pids(prefix)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(1.0)


def rows(run_dir: Path) -> dict[str, list[dict]]:
    """Every Parquet file of the run's data (real rows, rounds, mined errors, final set, baselines)."""
    out: dict[str, list[dict]] = {}
    for p in sorted(run_dir.rglob("*.parquet")):
        if "students" in p.parts:
            continue
        if "mining" in p.parts:  # Ray Data names its part files at random: a folder is one table, by id
            key = str(p.parent.relative_to(run_dir))
            out[key] = sorted(out.get(key, []) + pq.read_table(p).to_pylist(), key=lambda r: str(r.get("id")))
        else:
            out[str(p.relative_to(run_dir))] = pq.read_table(p).to_pylist()
    return out


def report_numbers(run_dir: Path) -> dict:
    """The report's numbers that depend only on the data and the students (not timings, not cache hits)."""
    rep = json.loads((run_dir / "report.json").read_text())
    gen = [{k: g[k] for k in ("step", "requested", "kept", "failed_calls", "dropped")} for g in rep["generation"]]
    rounds = [{k: r[k] for k in ("round", "new_rows", "total_rows", "train_rows", "errors_mined", "val", "test")}
              for r in rep["rounds"]]
    return {"comparison": rep["comparison"], "rounds": rounds, "generation": gen}
