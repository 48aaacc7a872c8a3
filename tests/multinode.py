"""A local multi-node Ray cluster for tests: a head that takes no work, a teacher node and a student node,
plus an S3 endpoint (moto) on loopback.

Each node runs `ray start --block` with its own HOME, TMPDIR, XDG_CACHE_HOME, HF_HOME, S3RAY_CACHE and Ray
temp dir, so anything a node writes under its own paths is invisible to the others, as on separate machines.
Every process a node starts carries S3RAY_TEST_CLUSTER=<root> in its environment; `stop()` ends the nodes
(SIGTERM to the `ray start --block` process drains and stops that node), then kills whatever still carries
the marker, with bounded waits. It never runs `ray stop`, which would stop every Ray process on the machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))
REPO = Path(__file__).resolve().parents[1]
MARKER = "S3RAY_TEST_CLUSTER"
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}
# The driver's own variables that must not leak into the nodes (they would point them at another cluster).
_DROP = ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR", "RAY_TMPDIR", "RAY_AUTH_TOKEN_PATH")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.5)


@dataclass
class Node:
    name: str
    home: Path
    proc: subprocess.Popen
    log: Path


@dataclass
class LocalCluster:
    root: Path
    address: str
    s3_endpoint: str | None
    nodes: list[Node] = field(default_factory=list)
    moto: subprocess.Popen | None = None
    dashboard: str | None = None  # http://HOST:PORT of the head's dashboard (`ray job submit --address`)
    # Ray 2.60 turns token auth on for a local ray.init() (and this process may have done one), so the test
    # cluster is a token cluster like a real one: every node and driver gets the same token, whatever HOME says.
    token: str = field(default_factory=lambda: secrets.token_hex(32))

    def node_env(self, name: str) -> dict[str, str]:
        """The environment of node `name`: its own home and caches, the S3 endpoint and credentials."""
        home = self.root / name
        env = {k: v for k, v in os.environ.items() if k not in _DROP}
        env.update({
            "HOME": str(home), "TMPDIR": str(home / "tmp"), "XDG_CACHE_HOME": str(home / "cache"),
            "HF_HOME": str(home / "hf"), "S3RAY_CACHE": str(home / "s3ray"), MARKER: str(self.root),
            "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
            # A killed node (connection refused at once) is declared dead in ~6 s instead of ~15 s, so its
            # actors restart elsewhere soon; a live node on a loaded machine gets 5 s per check, 3 tries.
            "RAY_health_check_period_ms": "2000", "RAY_health_check_failure_threshold": "3",
            "RAY_health_check_timeout_ms": "5000",
            # A machine at load 30+ answers GCS calls slowly; Ray's own 60 s budget ran out in `ray start`.
            "RAY_gcs_server_request_timeout_seconds": "300", "RAY_gcs_rpc_server_reconnect_timeout_s": "120",
            "RAY_raylet_start_wait_time_s": "180",  # how long `ray start` waits for its raylet to register
            # This checkout's s3ray and the test helpers, whatever is installed.
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH")])),
        })
        if self.s3_endpoint:
            env.update(S3_CREDENTIALS, S3RAY_S3_ENDPOINT=self.s3_endpoint)
        for sub in ("tmp", "cache", "hf", "s3ray"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        return env

    def start_node(self, name: str, args: list[str], timeout_s: float = 300, attempts: int = 5) -> Node:
        """`ray start` node `name`; on a loaded machine a start can time out inside Ray (a fixed 30 s for the
        raylet to register), so a failed start is cleaned up and tried again."""
        for attempt in range(1, attempts + 1):
            try:
                return self._start_node_once(name, args, timeout_s)
            except (RuntimeError, TimeoutError):
                self._kill_home(name)
                self.nodes = [n for n in self.nodes if n.name != name]
                shutil.rmtree(self.root / name / "r", ignore_errors=True)
                if attempt == attempts:
                    raise
                time.sleep(5)
        raise AssertionError("unreachable")

    def _start_node_once(self, name: str, args: list[str], timeout_s: float) -> Node:
        env = self.node_env(name)
        log = self.root / f"{name}.log"
        # Short temp paths: Ray's Unix sockets live below it and a socket path may not exceed 107 bytes.
        cmd = [RAY, "start", "--block", "--node-ip-address", "127.0.0.1", "--temp-dir", str(self.root / name / "r"),
               "--min-worker-port", "0", "--max-worker-port", "0", "--disable-usage-stats",
               "--dashboard-agent-listen-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
               "--object-store-memory", str(200 * 2**20), *args]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, env=env, cwd=env["HOME"], stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        node = Node(name, Path(env["HOME"]), proc, log)
        self.nodes.append(node)

        def started() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start for node {name} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            return "Ray runtime started" in log.read_text(errors="replace")

        _wait(started, timeout_s, f"Ray node {name} (log {log})")
        return node

    def _kill_home(self, name: str) -> list[int]:
        """SIGKILL every process of this cluster whose HOME is node `name`'s; their pids."""
        home = str(self.root / name)
        victims = []
        for p in self.processes():
            try:
                if p.environ().get("HOME") == home:
                    victims.append(p.pid)
                    p.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return victims

    def kill_node(self, name: str) -> None:
        """SIGKILL node `name` and every process it started (a machine that vanishes)."""
        node = next(n for n in self.nodes if n.name == name)
        try:
            os.kill(node.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._kill_home(name)
        node.proc.wait(timeout=30)

    def node_of(self, pid: int) -> str | None:
        """The name of the node whose process `pid` is (by its HOME), None if it is gone."""
        try:
            home = psutil.Process(pid).environ().get("HOME")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        return next((n.name for n in self.nodes if str(n.home) == home), None)

    def processes(self) -> list[psutil.Process]:
        """Every live process started for this cluster (found by the marker in its environment)."""
        found = []
        for p in psutil.process_iter(["pid"]):
            try:
                if p.environ().get(MARKER) == str(self.root) and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def stop(self, timeout_s: float = 60) -> None:
        """Stop every node (workers first) and moto; kill leftovers; bounded."""
        for node in reversed(self.nodes):
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s / 2
        for node in self.nodes:
            try:
                node.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(node.proc.pid, signal.SIGKILL)
                node.proc.wait(timeout=10)
        if self.moto is not None and self.moto.poll() is None:
            self.moto.terminate()
            try:
                self.moto.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.moto.kill()
        leftovers = self.processes()
        for p in leftovers:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(leftovers, timeout=timeout_s / 2, callback=None)
        for p in self.processes():
            p.kill()
        if not self.processes():
            shutil.rmtree(self.root, ignore_errors=True)


def run_driver(cluster: LocalCluster, args: list[str], timeout_s: float = 300) -> subprocess.CompletedProcess:
    """Run `python ARGS` as a driver of `cluster` on its own "machine" (home `d`), outside this test process
    (which may already hold the session's local Ray cluster)."""
    env = cluster.node_env("d")
    env["RAY_ADDRESS"] = cluster.address
    return subprocess.run([sys.executable, *args], check=False, env=env, cwd=env["HOME"], capture_output=True,
                          text=True, timeout=timeout_s)


def _start_moto(cluster: LocalCluster, timeout_s: float = 60) -> None:
    port = int(cluster.s3_endpoint.rsplit(":", 1)[1])
    env = cluster.node_env("s3")
    log = open(cluster.root / "moto.log", "wb")  # noqa: SIM115 - the child owns it for its lifetime
    cluster.moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                    env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def up() -> bool:
        if cluster.moto.poll() is not None:
            raise RuntimeError(f"moto server exited: {(cluster.root / 'moto.log').read_text()[-2000:]}")
        try:
            urllib.request.urlopen(cluster.s3_endpoint, timeout=2).close()
            return True
        except OSError:
            return False

    _wait(up, timeout_s, f"moto S3 server at {cluster.s3_endpoint}")


def start_cluster(gpus_per_worker: int = 0, with_s3: bool = True, worker_cpus: int = 1, dashboard: bool = False,
                  spare_teacher: bool = False) -> LocalCluster:
    """Head (no CPUs), a `teacher_node` and a `student_node` worker, and an S3 endpoint; all on loopback.
    `dashboard`: the head serves Ray's job API (`cluster.dashboard`); `spare_teacher`: a second
    `teacher_node` ("t2"), where a replica lost with its node comes back."""
    root = Path(tempfile.mkdtemp(prefix="s3mn-", dir="/tmp"))
    port = free_port()
    cluster = LocalCluster(root, f"127.0.0.1:{port}", f"http://127.0.0.1:{free_port()}" if with_s3 else None)
    try:
        if with_s3:
            _start_moto(cluster)
        dash = ["false"]
        if dashboard:
            dash_port = free_port()
            cluster.dashboard = f"http://127.0.0.1:{dash_port}"
            dash = ["true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port)]
        cluster.start_node("h", ["--head", "--port", str(port), "--num-cpus", "0", "--include-dashboard", *dash,
                                 "--ray-client-server-port", str(free_port())])
        gpu = ["--num-gpus", str(gpus_per_worker)] if gpus_per_worker else []
        workers = [("t", "teacher_node"), ("s", "student_node")] + ([("t2", "teacher_node")] if spare_teacher else [])
        for name, resource in workers:
            cluster.start_node(name, ["--address", cluster.address, "--num-cpus", str(worker_cpus),
                                      "--resources", f'{{"{resource}": 1}}', *gpu])
    except BaseException:
        cluster.stop()
        raise
    return cluster
