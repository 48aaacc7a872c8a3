"""A fleet of teacher replicas on Ray: streaming dispatch, an on-disk cache, and replica restarts.

    with TeacherPool(cfg.teacher, model_path, run_seed=cfg.run.seed, cache_path=run_dir / "cache.sqlite") as pool:
        results = pool.generate(requests, desc="seed synthesis")  # same order as `requests`

Design:
- `cfg.replicas` Ray actors (`_Replica`), each holding one engine from `make_engine` with its own engine seed
  `derive_seed(run_seed, "replica", i)`. On GPUs a replica reserves tensor_parallel_size x
  pipeline_parallel_size GPUs; with more than one, they are reserved together in a STRICT_PACK placement
  group, the actor runs inside it (capturing child tasks) and vLLM's Ray executor places its workers on the
  group's bundles (vLLM reads the current placement group when it runs inside a Ray actor). On CPUs a replica
  reserves `cpus_per_replica` CPUs and runs that many OpenMP threads, its vLLM engine in-process (see _launch).
- The driver streams: small chunks, at most `max_in_flight` requests outstanding per replica, each chunk to
  the least-loaded ready replica, results collected with `ray.wait` as they finish. A replica runs its
  chunks concurrently (a threaded actor) and the vLLM engine merges them into one continuous batch, so small
  chunks do not shrink the batch.
- Cache: requests already in the GenerationCache are never sent; successful results are written as each
  chunk returns, so an interrupted run resubmits only what never finished. Failed results are not cached.
- Faults: when a replica dies (or its engine raises), it is killed, every chunk it held goes back to the
  queue, and it is re-created (up to `max_restarts` times per replica) while the others keep working.
  Results are keyed by request_id and each request is recorded exactly once.
- The `openai` engine needs no accelerator: it runs in the driver (its own threads give the concurrency),
  with the same cache and ordering.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from s3ray.config import TeacherConfig
from s3ray.teacher.cache import GenerationCache
from s3ray.teacher.engines import kv_cache_env
from s3ray.teacher.types import GenerationRequest, GenerationResult, derive_seed

log = logging.getLogger("s3ray.teacher")


class TeacherPoolError(RuntimeError):
    """The pool cannot finish: every replica is dead and out of restarts, or none could start."""


class _Replica:
    """Ray actor body: one engine. Wrapped with ray.remote(...) at pool start (Ray stays at the edge)."""

    def __init__(self, cfg_json: str, model_path: str, engine_seed: int, index: int, engine_kwargs: dict,
                 in_placement_group: bool = False) -> None:
        from s3ray.runtime import set_cache_dirs
        from s3ray.teacher.engines import make_engine

        cfg = TeacherConfig.model_validate_json(cfg_json)
        if in_placement_group:
            # This actor holds no GPU itself (num_gpus=0), so Ray hid every GPU from it; vLLM's Ray workers
            # get theirs from the placement group bundles, and must not inherit the empty mask (as in vLLM's
            # own placement-group examples).
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        set_cache_dirs(os.environ.get("S3RAY_CACHE", Path.home() / ".cache" / "s3ray"))
        self.index = index
        self.engine = make_engine(cfg, model_path, engine_seed, **engine_kwargs)

    def ready(self) -> int:
        return os.getpid()

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        results = self.engine.generate(requests)
        for r in results:
            r.replica = self.index
        return results

    def close(self) -> None:
        self.engine.close()


@dataclass
class _Slot:
    """One replica position: its current actor, load and restart budget."""

    index: int
    actor: Any = None
    ready_ref: Any = None  # pending `ready()` call while (re)starting
    ready: bool = False
    pid: int | None = None
    load: int = 0
    restarts: int = 0
    dead: bool = False
    placement_group: Any = None
    chunks: set = field(default_factory=set)  # ObjectRefs in flight on this actor


class TeacherPool:
    """N teacher replicas behind one ordered, cached, fault-tolerant `generate`."""

    def __init__(
        self,
        cfg: TeacherConfig,
        model_path: str,
        run_seed: int,
        cache_path: str | Path | None = None,
        model_name: str | None = None,
        chunk_size: int | None = None,
        lazy_start: bool = False,
    ) -> None:
        """`lazy_start`: start the replicas at the first request the cache can't answer (a resumed run whose
        generation is finished then never loads the model)."""
        self.cfg = cfg
        self.model_path = str(model_path)
        self.run_seed = run_seed
        # Provenance name, and part of every cache key (with the engine: engines sample differently).
        self.model_name = model_name or self.model_path
        self._cache_model = f"{cfg.engine}:{self.model_name}"
        self.cache = GenerationCache(cache_path) if cache_path is not None else None
        # Small chunks keep load balanced and lose little work when a replica dies; the engine merges a
        # replica's concurrent chunks into one batch, so they cost no throughput.
        self.chunk_size = chunk_size or max(1, min(16, math.ceil(cfg.max_in_flight / 4)))
        self._stats = {"requests": 0, "cached": 0, "failures": 0, "prompt_tokens": 0, "output_tokens": 0,
                       "seconds": 0.0, "replicas_restarted": 0, "chunks_resubmitted": 0, "in_flight": 0,
                       "sent": 0, "duplicates_dropped": 0}
        self._slots: list[_Slot] = []
        self._local_engine = None
        self._closed = False
        if cfg.engine == "openai":
            from s3ray.teacher.engines import make_engine

            self._local_engine = make_engine(cfg, self.model_path, derive_seed(run_seed, "replica", 0))
        elif not lazy_start:
            self._start_replicas()

    # ------------------------------------------------------------------------------------ replicas

    def _start_replicas(self) -> None:
        import ray

        from s3ray.runtime import init_ray

        if not ray.is_initialized():
            init_ray()
        gpus = ray.cluster_resources().get("GPU", 0)
        self.use_gpu = bool(gpus > 0) if self.cfg.use_gpu is None else self.cfg.use_gpu
        world = self.cfg.tensor_parallel_size * self.cfg.pipeline_parallel_size
        if self.use_gpu and world * self.cfg.replicas > gpus:
            log.warning("teacher: %d replicas x %d GPUs requested, the cluster has %s GPUs: replicas wait",
                        self.cfg.replicas, world, gpus)
        self._slots = [_Slot(i) for i in range(self.cfg.replicas)]
        for slot in self._slots:
            self._launch(slot)
        # Wait for every replica once, so a broken model or config fails here with a clear message instead
        # of burning restarts later.
        for slot in self._slots:
            try:
                slot.pid = ray.get(slot.ready_ref)
                slot.ready, slot.ready_ref = True, None
            except Exception as e:
                self.shutdown()
                raise TeacherPoolError(
                    f"teacher replica {slot.index} failed to start ({self.cfg.engine} on {self.model_path}): {e}"
                ) from e
        log.info("teacher pool: %d %s replica(s) ready (%s)", len(self._slots), self.cfg.engine,
                 "GPU" if self.use_gpu else "CPU")

    def _launch(self, slot: _Slot) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cfg = self.cfg
        world = cfg.tensor_parallel_size * cfg.pipeline_parallel_size
        engine_kwargs: dict = {}
        env = {"TOKENIZERS_PARALLELISM": "false"}
        if cfg.engine == "vllm":
            env["VLLM_CPU_KVCACHE_SPACE"] = kv_cache_env(cfg)
        # Enough actor threads for every chunk in flight: the engine batches them together.
        opts: dict = {"max_concurrency": math.ceil(cfg.max_in_flight / self.chunk_size) + 2, "max_restarts": 0}
        if self.use_gpu and world > 1:
            # One bundle per GPU, packed on one node; the actor sits in bundle 0 and vLLM's Ray executor
            # puts its TP/PP workers on the group's bundles.
            pg = placement_group([{"GPU": 1, "CPU": 1} for _ in range(world)], strategy="STRICT_PACK")
            slot.placement_group = pg
            opts.update(num_cpus=0, num_gpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True))
            if cfg.engine == "vllm":
                engine_kwargs["distributed_executor_backend"] = "ray"
        elif self.use_gpu:
            opts.update(num_cpus=cfg.cpus_per_replica, num_gpus=1)
        else:
            opts.update(num_cpus=cfg.cpus_per_replica)
            # Torch/OpenMP threads = the CPUs Ray reserved for this replica (vLLM respects a preset value).
            env["OMP_NUM_THREADS"] = str(max(1, int(cfg.cpus_per_replica)))
            if cfg.engine == "vllm" and world == 1:
                # vLLM's CPU build in a Ray actor: by default it spawns an EngineCore process and a worker
                # process (both re-import torch+vLLM: ~30 s on 2 cores) and pins OpenMP threads to cores of
                # the whole node ("auto"), so replicas sharing a node would fight over the same cores.
                # In-process engine core + the single-process executor: ~11 s start, threads = the Ray
                # reservation above, and killing the actor leaves no orphan processes.
                env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
                engine_kwargs["distributed_executor_backend"] = "uni"
        opts["runtime_env"] = {"env_vars": env}
        actor_cls = ray.remote(_Replica).options(name=None, **opts)
        seed = derive_seed(self.run_seed, "replica", slot.index)
        slot.actor = actor_cls.remote(cfg.model_dump_json(), self.model_path, seed, slot.index, engine_kwargs,
                                      slot.placement_group is not None)
        slot.ready_ref = slot.actor.ready.remote()
        slot.ready, slot.load, slot.chunks = False, 0, set()

    def _fail_slot(self, slot: _Slot, err: BaseException, queue: deque, inflight: dict) -> None:
        """Kill the replica, put all its chunks back on the queue, restart it if budget is left."""
        import ray

        log.warning("teacher replica %d failed (%s: %s); resubmitting its %d chunk(s)", slot.index,
                    type(err).__name__, str(err)[:300], len(slot.chunks))
        for ref in list(slot.chunks):
            _, chunk = inflight.pop(ref)
            queue.appendleft(chunk)
            self._stats["chunks_resubmitted"] += 1
        slot.chunks.clear()
        slot.load = 0
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception as e:  # noqa: BLE001 - already gone
            log.debug("ray.kill: %s", e)
        if slot.restarts < self.cfg.max_restarts:
            slot.restarts += 1
            self._stats["replicas_restarted"] += 1
            self._launch(slot)
        else:
            slot.dead, slot.ready, slot.ready_ref = True, False, None
            log.error("teacher replica %d is out of restarts (teacher.max_restarts=%d)", slot.index,
                      self.cfg.max_restarts)

    def generate_on(self, replica: int, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Run `requests` on one given replica, bypassing cache and scheduling (diagnostics and tests)."""
        import ray

        if self._local_engine is not None:
            return self._local_engine.generate(list(requests))
        slot = self._slots[replica]
        if slot.ready_ref is not None:
            slot.pid = ray.get(slot.ready_ref)
            slot.ready, slot.ready_ref = True, None
        return ray.get(slot.actor.generate.remote(list(requests)))

    def replica_pids(self) -> list[int | None]:
        """Process id of each replica's actor (None while starting or dead)."""
        return [s.pid if s.ready else None for s in self._slots]

    # ---------------------------------------------------------------------------------- generation

    def generate(self, requests: Sequence[GenerationRequest], desc: str = "teacher") -> list[GenerationResult]:
        """Results in the order of `requests`. Failed calls come back with `.error` set (never cached)."""
        if self._closed:
            raise TeacherPoolError("generate() on a pool that was shut down")
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"request_id {dup!r} appears more than once; request ids must be unique per call")
        t0 = time.perf_counter()
        by_id: dict[str, GenerationResult] = self.cache.get_many(requests, self._cache_model) if self.cache else {}
        todo = [r for r in requests if r.request_id not in by_id]
        self._stats["cached"] += len(by_id)
        with tqdm(total=len(requests), initial=len(by_id), desc=desc, unit="req", dynamic_ncols=True) as bar:
            if todo:
                if self._local_engine is not None:
                    self._run_local(todo, by_id, bar)
                else:
                    if not self._slots:
                        self._start_replicas()
                    self._run_replicas(todo, by_id, bar)
        out = [by_id[r.request_id] for r in requests]
        self._stats["requests"] += len(requests)
        self._stats["failures"] += sum(not r.ok for r in out)
        for r in out:
            if not r.cached:
                self._stats["prompt_tokens"] += r.prompt_tokens
                self._stats["output_tokens"] += r.output_tokens
        self._stats["seconds"] += time.perf_counter() - t0
        return out

    def _record(self, reqs: Sequence[GenerationRequest], results: list[GenerationResult],
                by_id: dict[str, GenerationResult], bar) -> None:
        fresh = []
        for req, res in zip(reqs, results):
            if res.request_id != req.request_id:  # an engine bug must not silently mislabel outputs
                raise TeacherPoolError(f"engine returned {res.request_id!r} for request {req.request_id!r}")
            if req.request_id in by_id:  # a chunk answered twice (resubmitted after a fault): keep the first
                self._stats["duplicates_dropped"] += 1
                continue
            by_id[req.request_id] = res
            fresh.append((req, res))
        if self.cache is not None:
            self.cache.put_many(fresh, self._cache_model)  # one commit per chunk; failures are skipped
        bar.update(len(fresh))

    def _run_local(self, todo: list[GenerationRequest], by_id: dict, bar) -> None:
        step = self.cfg.openai.concurrency * 4
        for start in range(0, len(todo), step):
            chunk = todo[start : start + step]
            self._stats["sent"] += len(chunk)
            self._record(chunk, self._local_engine.generate(chunk), by_id, bar)

    def _run_replicas(self, todo: list[GenerationRequest], by_id: dict, bar) -> None:
        import ray

        queue: deque[list[GenerationRequest]] = deque(
            todo[i : i + self.chunk_size] for i in range(0, len(todo), self.chunk_size)
        )
        inflight: dict[Any, tuple[_Slot, list[GenerationRequest]]] = {}
        try:
            while queue or inflight:
                self._dispatch(queue, inflight)
                starting = {s.ready_ref: s for s in self._slots if s.ready_ref is not None}
                if not inflight and not starting:
                    raise TeacherPoolError(
                        f"every teacher replica is dead and out of restarts (teacher.max_restarts="
                        f"{self.cfg.max_restarts}); {sum(map(len, queue))} requests unfinished "
                        "(finished ones are in the cache: rerun to resume)"
                    )
                done, _ = ray.wait(list(inflight) + list(starting), num_returns=1, timeout=1.0)
                for ref in done:
                    if ref in starting:
                        self._on_ready(starting[ref], ref, queue, inflight)
                    elif ref in inflight:
                        self._on_result(ref, queue, inflight, by_id, bar)
                self._stats["in_flight"] = sum(len(c) for _, c in inflight.values())
        finally:
            self._stats["in_flight"] = 0
            # Interrupted (Ctrl-C or an error): cancel what is still out; its results are simply not recorded.
            for ref in inflight:
                try:
                    ray.cancel(ref)
                except Exception as e:  # noqa: BLE001 - its actor may be gone already
                    log.debug("ray.cancel: %s", e)

    def _dispatch(self, queue: deque, inflight: dict) -> None:
        while queue:
            live = [s for s in self._slots if s.ready and not s.dead
                    and s.load + len(queue[0]) <= self.cfg.max_in_flight]
            if not live:
                return
            slot = min(live, key=lambda s: (s.load, s.index))
            chunk = queue.popleft()
            ref = slot.actor.generate.remote(chunk)
            inflight[ref] = (slot, chunk)
            slot.chunks.add(ref)
            slot.load += len(chunk)
            self._stats["sent"] += len(chunk)

    def _on_ready(self, slot: _Slot, ref, queue: deque, inflight: dict) -> None:
        import ray

        try:
            slot.pid = ray.get(ref)
            slot.ready, slot.ready_ref = True, None
            log.info("teacher replica %d is back (restart %d)", slot.index, slot.restarts)
        except Exception as e:  # noqa: BLE001 - a failed restart counts against the budget
            slot.ready_ref = None
            self._fail_slot(slot, e, queue, inflight)

    def _on_result(self, ref, queue: deque, inflight: dict, by_id: dict, bar) -> None:
        import ray

        slot, chunk = inflight[ref]
        try:
            results = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
            # Actor died (RayActorError / ActorDiedError) or its engine raised: the replica is suspect
            # either way, so it is replaced and all its chunks rerun elsewhere.
            self._fail_slot(slot, e, queue, inflight)
            return
        inflight.pop(ref)
        slot.chunks.discard(ref)
        slot.load -= len(chunk)
        self._record(chunk, results, by_id, bar)

    # ------------------------------------------------------------------------------------ lifecycle

    def stats(self) -> dict:
        """Totals over every generate() call: requests, cached hits, failures, tokens, seconds, restarts."""
        return dict(self._stats)

    def shutdown(self) -> None:
        """Stop every replica and free its resources. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._local_engine is not None:
            self._local_engine.close()
        if self._slots:
            import ray

            closing = [s.actor.close.remote() for s in self._slots if s.ready and not s.dead]
            try:
                ray.wait(closing, num_returns=len(closing), timeout=30)
            except Exception as e:  # noqa: BLE001 - best effort before the kill below
                log.debug("replica close: %s", e)
            for s in self._slots:
                if s.actor is not None:
                    try:
                        ray.kill(s.actor, no_restart=True)
                    except Exception as e:  # noqa: BLE001
                        log.debug("ray.kill: %s", e)
                if s.placement_group is not None:
                    ray.util.remove_placement_group(s.placement_group)
        if self.cache is not None:
            self.cache.close()

    def __enter__(self) -> TeacherPool:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
