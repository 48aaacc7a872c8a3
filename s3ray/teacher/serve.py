"""Serve the teacher over the OpenAI API with vLLM (`s3ray serve`), and wait for such a server.

`vllm serve` fails with the CPU build (it looks up package metadata named `vllm`, STACK.md), so the server
runs as `python -m vllm.entrypoints.openai.api_server`, which both builds provide. The served model name is
the `--model` argument, which is what `OpenAIEngine` sends when given the same model path.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from s3ray.config import TeacherConfig
from s3ray.teacher.engines import cpu_workarounds, kv_cache_env


def server_command(cfg: TeacherConfig, model_path: str, host: str, port: int) -> list[str]:
    """argv of a vLLM OpenAI-compatible server for this teacher config."""
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_path),
        "--host", host,
        "--port", str(port),
        "--dtype", cfg.dtype,
        "--max-model-len", str(cfg.max_model_len),
        "--gpu-memory-utilization", str(cfg.gpu_memory_utilization),
        "--tensor-parallel-size", str(cfg.tensor_parallel_size),
        "--pipeline-parallel-size", str(cfg.pipeline_parallel_size),
        "--disable-uvicorn-access-log",
    ]
    if cpu_workarounds(cfg):  # see engines.cpu_workarounds: per-request seeds + chunked prefill crash on CPU
        cmd += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(max(4096, cfg.max_model_len))]
    if cfg.enforce_eager:
        cmd.append("--enforce-eager")
    if cfg.trust_remote_code:
        cmd.append("--trust-remote-code")
    return cmd


def server_env(cfg: TeacherConfig) -> dict[str, str]:
    """The environment for the server process: KV cache size for the CPU build, no usage reporting."""
    env = dict(os.environ)
    env["VLLM_CPU_KVCACHE_SPACE"] = kv_cache_env(cfg)
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    return env


def serve(cfg: TeacherConfig, model_path: str, host: str = "127.0.0.1", port: int = 8000) -> int:
    """Run the server in the foreground until it exits or Ctrl-C; returns its exit code."""
    proc = subprocess.Popen(server_command(cfg, model_path, host, port), env=server_env(cfg))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


def wait_until_ready(base_url: str, timeout_s: float = 300.0, proc: subprocess.Popen | None = None) -> None:
    """Poll `GET {base_url}/models` until it answers 200. Raises TimeoutError, or RuntimeError when `proc`
    (the server process) exits first."""
    import httpx

    url = base_url.rstrip("/") + "/models"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the teacher server exited with code {proc.returncode} before answering {url}")
        try:
            if httpx.get(url, timeout=5.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"no answer from {url} within {timeout_s:.0f} s")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_server(
    cfg: TeacherConfig,
    model_path: str,
    host: str = "127.0.0.1",
    port: int | None = None,
    log_path: str | Path | None = None,
    timeout_s: float = 300.0,
) -> Iterator[str]:
    """Start a server in the background, yield its base URL (`http://host:port/v1`) once it answers, and
    stop it afterwards. Output goes to `log_path` (else discarded)."""
    port = port or free_port(host)
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen(server_command(cfg, model_path, host, port), env=server_env(cfg), stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    base_url = f"http://{host}:{port}/v1"
    try:
        wait_until_ready(base_url, timeout_s, proc)
        yield base_url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: also stops the engine's subprocesses
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if log_path:
            out.close()
