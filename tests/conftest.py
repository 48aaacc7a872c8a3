"""Shared test setup: offline, caches inside a per-session temp dir, one local Ray cluster per session.

Fixtures that build tiny models live in fixtures_teacher.py / fixtures_student.py (loaded below).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="s3t-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("S3RAY_CACHE", str(_SESSION_TMP / "s3ray-cache"))

from s3ray.runtime import set_cache_dirs

set_cache_dirs(_SESSION_TMP / "caches")

pytest_plugins = ["fixtures_teacher", "fixtures_student"]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _drop_cli_log_handlers():
    """A test that calls the CLI in-process leaves the root logger writing to that test's captured stderr,
    which pytest closes afterwards; later log lines would print "--- Logging error ---" tracebacks."""
    import logging

    root = logging.getLogger()
    before = list(root.handlers)
    yield
    for h in root.handlers[:]:
        if h not in before and type(h) in (logging.StreamHandler, logging.FileHandler):  # not pytest's own
            root.removeHandler(h)
            h.close()


@pytest.fixture(scope="session")
def session_tmp() -> Path:
    return _SESSION_TMP


@pytest.fixture(scope="session")
def ray_local(session_tmp):
    """One local Ray cluster for the whole session (starting one costs seconds)."""
    import ray

    from s3ray.runtime import init_ray

    init_ray(num_cpus=4, temp_dir=str(session_tmp / "ray"))
    yield ray
    ray.shutdown()
