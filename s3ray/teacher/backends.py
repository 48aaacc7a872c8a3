"""Teacher backends: where requests run. The `Teacher` facade talks to any of them through `Backend`.

- `LocalBackend`: one engine in this process (no Ray), rebuilt after it breaks (up to `teacher.max_restarts`).
- `HttpBackend`: an OpenAI-compatible endpoint (the `openai` engine: concurrency, 429/5xx retry with backoff).
- `RayReplicaPool` (ray_pool.py): Ray actors each hosting an engine.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from s3ray.config import TeacherConfig
from s3ray.redact import redact_url
from s3ray.teacher.engines import Engine, make_engine
from s3ray.teacher.engines.base import error_text, failed
from s3ray.teacher.types import GenerationRequest, GenerationResult, TeacherError, derive_seed

log = logging.getLogger("s3ray.teacher")

# Called once per finished chunk (the facade caches it at once, so an interrupted run keeps it).
OnChunk = Callable[[list[GenerationRequest], list[GenerationResult]], None]


@dataclass
class Faults:
    """What went wrong and was absorbed: counted for `Teacher.stats()`."""

    restarts: int = 0  # engines/replicas replaced after dying or breaking
    retried_chunks: int = 0  # chunks sent again because their replica died under them
    retried_requests: int = 0  # the requests in those chunks
    poison_requests: int = 0  # requests isolated because they kept killing replicas (returned as errors)
    timeouts: int = 0  # replica starts or chunks past teacher.start_timeout_s / teacher.request_timeout_s


class Backend(Protocol):
    sent: int  # requests handed to an engine (a resubmitted one counts again)
    faults: Faults
    chunk_size: int  # requests per engine call

    def generate(self, requests: Sequence[GenerationRequest], on_chunk: OnChunk | None = None
                 ) -> list[GenerationResult]: ...

    def close(self) -> None: ...


class LocalBackend:
    """One engine in this process, fed in chunks. An engine that raises is closed, its chunk comes back as
    (retryable) errors, and a new engine is built for the next chunk, while `teacher.max_restarts` allows."""

    def __init__(self, factory: Callable[[], Engine], chunk_size: int, max_restarts: int) -> None:
        self.factory = factory
        self.chunk_size = chunk_size
        self.max_restarts = max_restarts
        self.sent = 0
        self.faults = Faults()
        self.engine: Engine | None = factory()

    def generate(self, requests: Sequence[GenerationRequest], on_chunk: OnChunk | None = None
                 ) -> list[GenerationResult]:
        out: list[GenerationResult] = []
        for start in range(0, len(requests), self.chunk_size):
            chunk = list(requests[start : start + self.chunk_size])
            results = self._run(chunk)
            if on_chunk is not None:
                on_chunk(chunk, results)
            out.extend(results)
        return out

    def _run(self, chunk: list[GenerationRequest]) -> list[GenerationResult]:
        if self.engine is None:
            if self.faults.restarts >= self.max_restarts:
                raise TeacherError(f"the teacher engine broke {self.faults.restarts + 1} times "
                                   f"(teacher.max_restarts={self.max_restarts})")
            self.faults.restarts += 1
            self.engine = self.factory()
        self.sent += len(chunk)
        try:
            return self.engine.generate(chunk)
        except Exception as e:  # noqa: BLE001 - a broken engine: report its chunk, rebuild it for the next one
            log.warning("teacher engine failed (%s); it is rebuilt for the next chunk", error_text(e))
            self.engine.close()
            self.engine = None
            return [failed(r, e) for r in chunk]

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def chunk_size_of(cfg: TeacherConfig, backend: str) -> int:
    """Requests per engine call of each backend, known before it starts (callers align shards to it)."""
    if backend == "http":
        return cfg.openai.concurrency * 4
    if backend == "local":
        return max(1, math.ceil(cfg.max_in_flight))
    # Ray pool: small chunks keep load balanced and lose little work when a replica dies; the engine merges
    # a replica's concurrent chunks into one batch, so they cost no throughput.
    return max(1, min(16, math.ceil(cfg.max_in_flight / 4)))


class HttpBackend(LocalBackend):
    """An OpenAI-compatible endpoint: `teacher.openai.concurrency` requests in flight (the engine's threads)."""

    def __init__(self, cfg: TeacherConfig, model: str, run_seed: int) -> None:
        from s3ray.teacher.engines.openai import OpenAIEngine

        self.endpoint = redact_url(cfg.openai.base_url)
        super().__init__(lambda: OpenAIEngine(cfg, model, derive_seed(run_seed, "replica", 0)),
                         chunk_size=chunk_size_of(cfg, "http"), max_restarts=cfg.max_restarts)


def local_backend(cfg: TeacherConfig, model_path: str, run_seed: int) -> LocalBackend:
    """`cfg.engine` in this process (the engine seed of replica 0, as the Ray pool's first replica)."""
    seed = derive_seed(run_seed, "replica", 0)
    return LocalBackend(lambda: make_engine(cfg, model_path, seed),
                        chunk_size=chunk_size_of(cfg, "local"), max_restarts=cfg.max_restarts)
