"""`Teacher`: the one entry point for generation, over any backend (local engine, Ray replicas, HTTP).

    with make_teacher(cfg.teacher, teacher_model_path(cfg.teacher), run_seed=cfg.run.seed,
                      cache_path=run_dir / "teacher_cache.sqlite") as teacher:
        results = teacher.generate(requests, desc="seed synthesis")  # same order as `requests`

The facade owns what every backend shares: the generation cache (requests it can answer are never sent;
each finished chunk is written at once; failures never), request order, bounded retries of failed requests
(`teacher.max_attempts`), stats and the progress bar. The backend starts at the first request the cache
can't answer; `release()` frees it (replicas, GPUs) and the next uncached request starts it again.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from tqdm.auto import tqdm

from s3ray.config import TeacherConfig
from s3ray.redact import redact_url
from s3ray.teacher.backends import Backend, Faults, HttpBackend, chunk_size_of, local_backend
from s3ray.teacher.cache import GenerationCache
from s3ray.teacher.types import GenerationRequest, GenerationResult, TeacherError

log = logging.getLogger("s3ray.teacher")

# Files whose content decides what a local model folder generates (weights are covered by their sizes).
_IDENTITY_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json",
                   "chat_template.jinja", "model.safetensors.index.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


@dataclass
class TeacherStats:
    requests: int = 0  # asked for, over every generate() call
    cached: int = 0  # answered by the cache
    sent: int = 0  # handed to an engine (resubmissions and retries count again)
    failed: int = 0  # came back with an error after every attempt
    retries: int = 0  # failed requests tried again (teacher.max_attempts)
    prompt_tokens: int = 0
    output_tokens: int = 0
    seconds: float = 0.0
    duplicates_dropped: int = 0  # answers to a request already answered (a resubmitted chunk)
    restarts: int = 0
    retried_chunks: int = 0
    retried_requests: int = 0
    poison_requests: int = 0
    timeouts: int = 0
    backend_starts: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def model_fingerprint(model_path: str) -> str:
    """A short content hash of a local model folder (config/tokenizer files, weight file names and sizes);
    a hub id or served name is its own identity."""
    folder = Path(model_path)
    if not folder.is_dir():
        return ""
    h = hashlib.sha256()
    for name in _IDENTITY_FILES:
        if (folder / name).is_file():
            h.update(name.encode() + b"\0" + (folder / name).read_bytes())
    for f in sorted(folder.iterdir()):
        if f.suffix in _WEIGHT_SUFFIXES:
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def model_identity(cfg: TeacherConfig, model_name: str, model_path: str) -> str:
    """The model part of every cache key: engine, name, and what it really is (folder fingerprint, or the
    endpoint without credentials), so a changed model or endpoint never reuses old answers."""
    if cfg.engine == "openai":
        return f"openai:{model_name}@{redact_url(cfg.openai.base_url)}"
    fp = model_fingerprint(model_path)
    return f"{cfg.engine}:{model_name}" + (f"#{fp}" if fp else "")


def teacher_model_path(cfg: TeacherConfig) -> str:
    """What the engine loads: a local folder for vllm/transformers; the served model name for openai."""
    if cfg.engine == "openai":
        return cfg.model
    from s3ray.models import resolve_teacher

    return resolve_teacher(cfg.model)


class Teacher:
    """Ordered, cached, retried generation over one lazily started backend."""

    def __init__(self, cfg: TeacherConfig, backend_factory: Callable[[], Backend], model_name: str,
                 cache_model: str, cache_path: str | Path | None = None, chunk_hint: int | None = None) -> None:
        self.cfg = cfg
        self._chunk_hint = chunk_hint  # the backend's chunk_size, so callers can align without starting it
        self.model_name = model_name  # provenance
        self.cache_model = cache_model  # part of every cache key (model_identity)
        self.cache = GenerationCache(cache_path) if cache_path is not None else None
        self._factory = backend_factory
        self._backend: Backend | None = None
        self._stats = TeacherStats()
        self._faults_done = Faults()  # counters of released backends
        self._sent_done = 0
        self._closed = False

    # ---------------------------------------------------------------------------------- generation

    def generate(self, requests: Sequence[GenerationRequest], desc: str = "teacher",
                 progress: bool = True) -> list[GenerationResult]:
        """Results in the order of `requests`. A request that fails `teacher.max_attempts` times comes back
        with `.error` set (never cached); a non-retryable failure (e.g. a too-long prompt) is tried once."""
        if self._closed:
            raise TeacherError("generate() on a teacher that was closed")
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"request_id {dup!r} appears more than once; request ids must be unique per call")
        t0 = time.perf_counter()
        by_id = self.cache.get_many(requests, self.cache_model) if self.cache else {}
        self._stats.cached += len(by_id)
        with tqdm(total=len(requests), initial=len(by_id), desc=desc, unit="req", dynamic_ncols=True,
                  disable=not progress) as bar:
            todo = [r for r in requests if r.request_id not in by_id]
            for attempt in range(self.cfg.max_attempts):
                if not todo:
                    break
                if attempt:
                    self._stats.retries += len(todo)
                    log.info("%s: trying %d failed request(s) again (attempt %d of teacher.max_attempts=%d)",
                             desc, len(todo), attempt + 1, self.cfg.max_attempts)
                self._run(todo, by_id, bar)
                todo = [r for r in todo if by_id[r.request_id].error and by_id[r.request_id].retryable]
            bar.update(len(todo))
        out = [by_id[r.request_id] for r in requests]
        self._stats.requests += len(requests)
        self._stats.failed += sum(not r.ok for r in out)
        fresh = [r for r in out if not r.cached]
        self._stats.prompt_tokens += sum(r.prompt_tokens for r in fresh)
        self._stats.output_tokens += sum(r.output_tokens for r in fresh)
        self._stats.seconds += time.perf_counter() - t0
        return out

    def generate_iter(self, requests: Iterable[GenerationRequest], block_size: int, desc: str = "teacher"
                      ) -> Iterator[GenerationResult]:
        """Results in the order of `requests`, read `block_size` at a time: memory stays bounded however
        long the stream, and every finished chunk is cached at once (as in `generate`). Resumes are exact
        when `block_size` is a multiple of `chunk_size()`: the cache then holds whole chunks, so the
        requests still to do form the same engine chunks (and batches) as in an uninterrupted run."""
        block: list[GenerationRequest] = []
        for req in requests:
            block.append(req)
            if len(block) == block_size:
                yield from self.generate(block, desc=desc, progress=False)
                block = []
        if block:
            yield from self.generate(block, desc=desc, progress=False)

    def chunk_size(self) -> int:
        """Requests per engine call of the backend (known from the config; starts nothing)."""
        if self._backend is not None:
            return int(self._backend.chunk_size)
        return self._chunk_hint or int(self._ensure_backend().chunk_size)

    def _run(self, todo: list[GenerationRequest], by_id: dict[str, GenerationResult], bar) -> None:
        answered: set[str] = set()

        def on_chunk(chunk: list[GenerationRequest], results: list[GenerationResult]) -> None:
            fresh = []
            for req, res in zip(chunk, results):
                if res.request_id != req.request_id:  # an engine bug must not silently mislabel outputs
                    raise TeacherError(f"engine returned {res.request_id!r} for request {req.request_id!r}")
                if req.request_id in answered:  # answered twice (a resubmitted chunk): keep the first
                    self._stats.duplicates_dropped += 1
                    continue
                answered.add(req.request_id)
                by_id[req.request_id] = res
                fresh.append((req, res))
            if self.cache is not None:
                self.cache.put_many(fresh, self.cache_model)  # one commit per chunk; failures are skipped
            bar.update(sum(r.ok or not r.retryable for _, r in fresh))

        self._ensure_backend().generate(todo, on_chunk)

    def _ensure_backend(self) -> Backend:
        if self._backend is None:
            self._backend = self._factory()
            self._stats.backend_starts += 1
        return self._backend

    # ------------------------------------------------------------------------------------ lifecycle

    @property
    def started(self) -> bool:
        """Whether a backend (engine, replicas, HTTP client) is up now."""
        return self._backend is not None

    def stats(self) -> TeacherStats:
        """Totals over every generate() call (a copy)."""
        st = TeacherStats(**self._stats.to_dict())
        faults, sent = asdict(self._faults_done), self._sent_done
        if self._backend is not None:
            sent += self._backend.sent
            faults = {k: v + getattr(self._backend.faults, k) for k, v in faults.items()}
        st.sent = sent
        for f in fields(Faults):
            setattr(st, f.name, faults[f.name])
        return st

    def release(self) -> None:
        """Free the backend (replicas, GPUs, engine memory); the next uncached request starts it again."""
        if self._backend is not None:
            backend, self._backend = self._backend, None
            self._sent_done += backend.sent
            for f in fields(Faults):
                setattr(self._faults_done, f.name, getattr(self._faults_done, f.name) + getattr(backend.faults, f.name))
            backend.close()

    def close(self) -> None:
        """Release the backend and close the cache. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.release()
        if self.cache is not None:
            self.cache.close()

    def __enter__(self) -> Teacher:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_teacher(cfg: TeacherConfig, model_path: str, run_seed: int, cache_path: str | Path | None = None,
                 model_name: str | None = None, backend: str | None = None,
                 node_model_path: str | None = None) -> Teacher:
    """A `Teacher` for `cfg`. `backend`: "ray" (replicas on Ray; the default for vllm/transformers), "local"
    (the engine in this process) or "http" (the default, and only choice, for engine openai). Nothing starts
    until the first request the cache can't answer. `node_model_path`: what Ray replicas load instead of
    `model_path` (an embedded model's name, or weights staged in the run storage; models.on_this_node)."""
    backend = backend or ("http" if cfg.engine == "openai" else "ray")
    if (backend == "http") != (cfg.engine == "openai"):
        raise ValueError(f"backend {backend!r} does not run teacher.engine={cfg.engine!r}: "
                         "use http for openai, ray or local for vllm/transformers")
    model_path = str(model_path)
    name = model_name or model_path
    if backend == "http":
        factory: Callable[[], Backend] = lambda: HttpBackend(cfg, model_path, run_seed)
    elif backend == "local":
        factory = lambda: local_backend(cfg, model_path, run_seed)
    elif backend == "ray":
        def factory() -> Backend:
            from s3ray.teacher.ray_pool import RayReplicaPool  # imports Ray: only when replicas start

            return RayReplicaPool(cfg, node_model_path or model_path, run_seed)
    else:
        raise ValueError(f"backend {backend!r}: use ray, local or http")
    return Teacher(cfg, factory, name, model_identity(cfg, name, model_path), cache_path,
                   chunk_hint=chunk_size_of(cfg, backend))
