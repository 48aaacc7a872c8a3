"""Serve the teacher over the OpenAI API with vLLM (`s3ray serve`), and wait for such a server.

`vllm serve` fails with the CPU build (it looks up package metadata named `vllm`, docs/stack.md), so the server
runs as `python -m vllm.entrypoints.openai.api_server`, which both builds provide. The served model name is
the `--model` argument, which is what `OpenAIEngine` sends when given the same model path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from s3ray.config import TeacherConfig
from s3ray.redact import redact_url
from s3ray.teacher.cpu import engine_env, vllm_engine_args

log = logging.getLogger("s3ray.teacher")
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _flags(args: dict) -> list[str]:
    """Engine arguments as the server's command-line flags (True: --x, False: --no-x, else --x value)."""
    out: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is False:
            out.append("--no-" + flag[2:])
        else:
            out += [flag, json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    return out


def server_command(cfg: TeacherConfig, model_path: str, host: str, port: int) -> list[str]:
    """argv of a vLLM OpenAI-compatible server for this teacher config (no API key: see `serve`)."""
    v = cfg.vllm
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_path), "--host", host, "--port", str(port), "--dtype", cfg.dtype,
        "--max-model-len", str(v.max_model_len), "--gpu-memory-utilization", str(v.gpu_memory_utilization),
        "--tensor-parallel-size", str(cfg.tensor_parallel_size),
        "--pipeline-parallel-size", str(cfg.pipeline_parallel_size), "--disable-uvicorn-access-log",
    ]
    cmd += _flags({**vllm_engine_args(cfg), **v.engine_args})  # CPU workarounds, then the user's own
    if v.enforce_eager:
        cmd.append("--enforce-eager")
    if cfg.trust_remote_code:
        cmd.append("--trust-remote-code")
    return cmd


def server_env(cfg: TeacherConfig) -> dict[str, str]:
    """The environment for the server process: the engine's (cpu.engine_env), no usage reporting."""
    env = dict(os.environ)
    env.update(engine_env(cfg))
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    return env


def api_key_env_vars(api_key_env: str | None, host: str) -> dict[str, str]:
    """The server's API key, read from the variable `api_key_env` and handed over as VLLM_API_KEY (the
    server's `--api-key` in its environment, not its argv, where `ps` would show it). Warns when binding
    beyond loopback without a key."""
    if api_key_env:
        key = os.environ.get(api_key_env)
        if not key:
            raise ValueError(f"--api-key-env {api_key_env}: that environment variable is not set or empty")
        return {"VLLM_API_KEY": key}
    if host not in _LOOPBACK:
        log.warning("serving on %s without an API key: anyone who reaches this port can use the teacher "
                    "(set one with --api-key-env VAR)", host)
    return {}


def serve(cfg: TeacherConfig, model_path: str, host: str = "127.0.0.1", port: int = 8000,
          api_key_env: str | None = None) -> int:
    """Run the server in the foreground until it exits or Ctrl-C; returns its exit code."""
    env = {**server_env(cfg), **api_key_env_vars(api_key_env, host)}
    log.info("teacher server: %s", redact_url(f"http://{host}:{port}/v1"))
    proc = subprocess.Popen(server_command(cfg, model_path, host, port), env=env)
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
    url = base_url.rstrip("/") + "/models"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the teacher server exited with code {proc.returncode} before answering "
                               f"{redact_url(url)}")
        try:
            if httpx.get(url, timeout=5.0).status_code in (200, 401):  # 401: up, and asking for its key
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"no answer from {redact_url(url)} within {timeout_s:.0f} s")


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
    api_key_env: str | None = None,
) -> Iterator[str]:
    """Start a server in the background, yield its base URL (`http://host:port/v1`) once it answers, and
    stop it afterwards. Output goes to `log_path` (else discarded). `api_key_env`: as `serve`."""
    port = port or free_port(host)
    env = {**server_env(cfg), **api_key_env_vars(api_key_env, host)}
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen(server_command(cfg, model_path, host, port), env=env, stdout=out,
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
