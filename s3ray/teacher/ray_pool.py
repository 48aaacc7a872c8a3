"""`RayReplicaPool`: teacher replicas as Ray actors, with streaming dispatch, deadlines, restarts and poison
isolation. The only module of s3ray.teacher that imports Ray.

- `cfg.replicas` actors (`_Replica`), each holding one engine with its own engine seed
  `derive_seed(run_seed, "replica", i)`, each in its own placement group (`capacity.replica_bundles`), so
  placement and engine start have separate deadlines and messages, and a replaced replica's reservation goes
  with it. On GPUs a replica reserves tensor_parallel_size x pipeline_parallel_size GPUs; with more than one,
  one bundle per GPU, STRICT_PACKed on one node: the actor runs in bundle 0 (capturing child tasks) and vLLM's
  Ray executor places its workers on the group's bundles. On CPUs a replica reserves `cpus_per_replica` CPUs
  and runs that many OpenMP threads, its vLLM engine in-process (cpu.engine_env).
- The driver streams small chunks, at most `max_in_flight` requests per replica, each to the least-loaded ready
  replica; a replica runs its chunks concurrently (a threaded actor) and vLLM merges them into one batch.
- Faults: a replica that dies, raises, or holds a chunk past `teacher.request_timeout_s` is killed (its
  placement group removed) and restarted up to `teacher.max_restarts` times; its chunks go back to the queue.
  A chunk that was out during a death is suspect and next runs alone on a replica; a suspect chunk that kills
  its replica alone is split in two, and a single request that does so twice is returned as a poison error.
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from s3ray.capacity import describe_nodes, merged, replica_bundles, replica_too_big, shape, teacher_uses_gpu
from s3ray.config import TeacherConfig
from s3ray.models import on_this_node
from s3ray.runtime import init_ray, node_resources, set_cache_dirs
from s3ray.teacher.backends import Faults, OnChunk, chunk_size_of
from s3ray.teacher.cpu import engine_env
from s3ray.teacher.engines import make_engine
from s3ray.teacher.engines.base import CALL_LOG_ENV, error_text, failed
from s3ray.teacher.types import GenerationRequest, GenerationResult, TeacherError, derive_seed

log = logging.getLogger("s3ray.teacher")


class _Replica:
    """Ray actor body: one engine."""

    def __init__(self, cfg_json: str, model_path: str, engine_seed: int, index: int, engine_kwargs: dict,
                 workers_in_bundles: bool) -> None:
        if workers_in_bundles:
            # This actor holds no GPU itself (num_gpus=0), so Ray hid every GPU from it; vLLM's Ray workers get
            # theirs from the placement group bundles and must not inherit the empty mask.
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        set_cache_dirs(os.environ.get("S3RAY_CACHE", Path.home() / ".cache" / "s3ray"))
        model_path = on_this_node(model_path)  # embedded or staged weights: this node's own copy
        self.index = index
        self.engine = make_engine(TeacherConfig.model_validate_json(cfg_json), model_path, engine_seed,
                                  **engine_kwargs)

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
class _Chunk:
    requests: list[GenerationRequest]
    failures: int = 0  # replica deaths while this chunk was out; > 0: suspect, runs alone

    def halves(self) -> list[_Chunk]:
        mid = len(self.requests) // 2
        return [_Chunk(self.requests[:mid], self.failures), _Chunk(self.requests[mid:], self.failures)]


@dataclass
class _Slot:
    """One replica position: its current actor, load and restart budget."""

    index: int
    actor: Any = None
    ready_ref: Any = None  # pending `ready()` call while (re)starting
    since: float = 0.0  # when the current actor was launched
    restarts: int = 0
    dead: bool = False
    alone: bool = False  # running a suspect chunk: takes nothing else
    placement_group: Any = None
    chunks: dict = field(default_factory=dict)  # ObjectRef -> (_Chunk, sent at)

    @property
    def ready(self) -> bool:
        return self.actor is not None and self.ready_ref is None and not self.dead

    @property
    def load(self) -> int:
        return sum(len(c.requests) for c, _ in self.chunks.values())


class RayReplicaPool:
    """`cfg.replicas` engines on Ray behind one ordered `generate`. Starts its replicas in the constructor."""

    def __init__(self, cfg: TeacherConfig, model_path: str, run_seed: int, chunk_size: int | None = None) -> None:
        self.cfg, self.model_path, self.run_seed = cfg, str(model_path), run_seed
        self.chunk_size = chunk_size or chunk_size_of(cfg, "ray")
        self.sent = 0
        self.faults = Faults()
        self._last_failure = "none"
        # Actors are named `<name>-r<replica>-<restart>` (`ray list actors`, `ray.get_actor` find them).
        self.name = f"s3ray-teacher-{uuid.uuid4().hex[:8]}"
        if not ray.is_initialized():
            init_ray()
        nodes = node_resources()
        self.use_gpu = teacher_uses_gpu(cfg, nodes)
        self.world = cfg.tensor_parallel_size * cfg.pipeline_parallel_size
        self.bundles = replica_bundles(cfg, self.use_gpu)
        too_big = replica_too_big(cfg, self.use_gpu, nodes)  # it would wait forever
        if too_big:
            raise TeacherError(f"{too_big} (nodes: {describe_nodes(nodes, free=False)})")
        self._slots = [_Slot(i) for i in range(cfg.replicas)]
        self._start_all()

    # ------------------------------------------------------------------------------------ replicas

    def _start_all(self) -> None:
        for slot in self._slots:
            self._launch(slot)
        # Wait for every replica once, so a broken model or config fails here with a clear message.
        deadline = time.monotonic() + self.cfg.start_timeout_s
        for slot in self._slots:
            try:
                placed, _ = ray.wait([slot.placement_group.ready()], timeout=max(0.0, deadline - time.monotonic()))
                if not placed:
                    raise GetTimeoutError
                ray.get(slot.ready_ref, timeout=max(0.0, deadline - time.monotonic()))
                slot.ready_ref = None
            except GetTimeoutError:
                why = self._start_timeout_text(slot)  # before close() removes the placement group
                self.close()
                raise TeacherError(why) from None
            except RayError as e:
                self.close()
                raise TeacherError(f"teacher replica {slot.index} failed to start ({self.cfg.engine} on "
                                   f"{self.model_path}): {error_text(e)}") from e
        log.info("teacher pool: %d %s replica(s) ready (%s)", len(self._slots), self.cfg.engine,
                 "GPU" if self.use_gpu else "CPU")

    def _start_timeout_text(self, slot: _Slot) -> str:
        """Why replica `slot` is not up by its deadline: not placed (the shapes, and what is free per node),
        or placed but its engine did not load."""
        limit = f"teacher.start_timeout_s={self.cfg.start_timeout_s:g} s"
        group = slot.placement_group
        if group is not None and placement_group_table(group).get("state") != "CREATED":
            n = len(self.bundles)
            how = f"{n} bundles of {shape(self.bundles[0])} on one node (STRICT_PACK)" if n > 1 else \
                shape(self.bundles[0])
            return (f"teacher replica {slot.index} could not be placed within {limit}: it needs {how}, "
                    f"{shape(merged(self.bundles))} in all; free per node: {describe_nodes(node_resources())}. "
                    "Free those resources, lower teacher.replicas, or raise teacher.start_timeout_s")
        return (f"teacher replica {slot.index} was placed but its {self.cfg.engine} engine did not load "
                f"{self.model_path} within {limit}: raise it for a large model, or read the replica's log")

    def _launch(self, slot: _Slot) -> None:
        cfg, world = self.cfg, self.world
        engine_kwargs: dict = {}
        on_cpu = not self.use_gpu
        env = engine_env(cfg, threads=cfg.cpus_per_replica if on_cpu else None, in_process=on_cpu and world == 1)
        if os.environ.get(CALL_LOG_ENV):  # the opt-in engine call log, also from replicas on other nodes
            env[CALL_LOG_ENV] = os.environ[CALL_LOG_ENV]
        # Enough actor threads for every chunk in flight: the engine batches them together.
        opts: dict = {"max_concurrency": math.ceil(cfg.max_in_flight / self.chunk_size) + 2, "max_restarts": 0,
                      "runtime_env": {"env_vars": env}}
        slot.placement_group = placement_group(self.bundles, strategy="STRICT_PACK")
        multi_gpu = self.use_gpu and world > 1
        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=slot.placement_group, placement_group_bundle_index=0,
            placement_group_capture_child_tasks=multi_gpu)
        if multi_gpu:
            # The actor holds nothing itself; vLLM's Ray executor puts its TP/PP workers on the group's bundles.
            opts.update(num_cpus=0, num_gpus=0)
            if cfg.engine == "vllm":
                engine_kwargs["distributed_executor_backend"] = "ray"
        else:  # the actor takes its one bundle whole
            opts.update(num_cpus=self.bundles[0]["CPU"], num_gpus=self.bundles[0].get("GPU", 0))
            if not self.use_gpu and cfg.engine == "vllm" and world == 1:
                engine_kwargs["distributed_executor_backend"] = "uni"  # in-process, see cpu.engine_env
        seed = derive_seed(self.run_seed, "replica", slot.index)
        opts["name"] = f"{self.name}-r{slot.index}-{slot.restarts}"
        slot.actor = ray.remote(_Replica).options(**opts).remote(
            cfg.model_dump_json(), self.model_path, seed, slot.index, engine_kwargs, multi_gpu)
        slot.ready_ref = slot.actor.ready.remote()
        slot.since, slot.chunks, slot.alone = time.monotonic(), {}, False

    def _kill(self, slot: _Slot) -> None:
        try:
            ray.kill(slot.actor, no_restart=True)
        except RayError as e:  # already gone
            log.debug("ray.kill: %s", e)
        if slot.placement_group is not None:  # a restart makes a new group; the old one must not hold GPUs
            remove_placement_group(slot.placement_group)
            slot.placement_group = None
        slot.actor, slot.ready_ref = None, None

    # ---------------------------------------------------------------------------------- generation

    def generate(self, requests: Sequence[GenerationRequest], on_chunk: OnChunk | None = None
                 ) -> list[GenerationResult]:
        """Results in the order of `requests`; raises TeacherError when every replica is out of restarts."""
        self._by_id: dict[str, GenerationResult] = {}
        self._on_chunk = on_chunk
        cs = self.chunk_size
        queue = deque(_Chunk(list(requests[i : i + cs])) for i in range(0, len(requests), cs))
        inflight: dict[Any, _Slot] = {}
        try:
            while queue or inflight:
                self._dispatch(queue, inflight)
                starting = {s.ready_ref: s for s in self._slots if s.ready_ref is not None}
                if not inflight and not starting:
                    raise TeacherError(
                        f"every teacher replica is dead and out of restarts (teacher.max_restarts="
                        f"{self.cfg.max_restarts}); {sum(len(c.requests) for c in queue)} requests unfinished "
                        f"(finished ones are in the cache: rerun to resume). Last failure: {self._last_failure}")
                done, _ = ray.wait(list(inflight) + list(starting), num_returns=1, timeout=self._wait_s())
                for ref in done:
                    if ref in starting:
                        self._on_ready(starting[ref], queue, inflight)
                    elif ref in inflight:
                        self._on_result(ref, queue, inflight)
                self._check_deadlines(queue, inflight)
        finally:
            for ref in inflight:  # interrupted: cancel what is still out; its results are not recorded
                try:
                    ray.cancel(ref)
                except RayError as e:  # its actor may be gone already
                    log.debug("ray.cancel: %s", e)
        return [self._by_id[r.request_id] for r in requests]

    def _deliver(self, chunk: list[GenerationRequest], results: list[GenerationResult]) -> None:
        for res in results:
            self._by_id[res.request_id] = res
        if self._on_chunk is not None:
            self._on_chunk(chunk, results)

    def _dispatch(self, queue: deque, inflight: dict) -> None:
        while queue:
            chunk = queue[0]
            if chunk.failures:  # suspect: alone on an idle replica, so a death blames it for sure
                live = [s for s in self._slots if s.ready and not s.chunks]
            else:
                live = [s for s in self._slots if s.ready and not s.alone
                        and s.load + len(chunk.requests) <= self.cfg.max_in_flight]
            if not live:
                return
            slot = min(live, key=lambda s: (s.load, s.index))
            queue.popleft()
            ref = slot.actor.generate.remote(chunk.requests)
            slot.chunks[ref] = (chunk, time.monotonic())
            slot.alone = bool(chunk.failures)
            inflight[ref] = slot
            self.sent += len(chunk.requests)

    def _on_ready(self, slot: _Slot, queue: deque, inflight: dict) -> None:
        try:
            ray.get(slot.ready_ref)
            slot.ready_ref = None
            log.info("teacher replica %d is back (restart %d)", slot.index, slot.restarts)
        except RayError as e:  # a failed restart counts against the budget
            self._fail_slot(slot, e, queue, inflight)

    def _on_result(self, ref, queue: deque, inflight: dict) -> None:
        slot = inflight[ref]
        try:
            results = ray.get(ref)
        except RayError as e:
            # The actor died (RayActorError, OOM, node lost, object lost...) or its engine raised: the
            # replica is suspect either way, so it is replaced and its chunks rerun.
            self._fail_slot(slot, e, queue, inflight)
            return
        chunk, _ = slot.chunks.pop(ref)
        inflight.pop(ref)
        slot.alone = False
        self._deliver(chunk.requests, results)

    def _wait_s(self) -> float:
        """How long to wait for a result: at most 1 s, and never past the nearest deadline, so a short
        `request_timeout_s` fires on time instead of at the next whole second."""
        now, nearest = time.monotonic(), 1.0
        for slot in self._slots:
            if slot.ready_ref is not None:
                nearest = min(nearest, slot.since + self.cfg.start_timeout_s - now)
            for _, sent in slot.chunks.values():
                nearest = min(nearest, sent + self.cfg.request_timeout_s - now)
        return max(0.01, nearest + 0.01)

    def _check_deadlines(self, queue: deque, inflight: dict) -> None:
        now = time.monotonic()
        for slot in self._slots:
            if slot.ready_ref is not None and now - slot.since > self.cfg.start_timeout_s:
                self.faults.timeouts += 1
                self._fail_slot(slot, TimeoutError(self._start_timeout_text(slot)), queue, inflight)
            elif any(now - sent > self.cfg.request_timeout_s for _, sent in slot.chunks.values()):
                self.faults.timeouts += 1
                why = f"a chunk ran past teacher.request_timeout_s={self.cfg.request_timeout_s:g} s"
                self._fail_slot(slot, TimeoutError(why), queue, inflight)

    def _fail_slot(self, slot: _Slot, err: BaseException, queue: deque, inflight: dict) -> None:
        """Kill the replica, requeue (or bisect, or isolate) its chunks, restart it if budget is left."""
        why = error_text(getattr(err, "cause", None) or err)  # RayTaskError: the engine's own exception
        self._last_failure = why
        log.warning("teacher replica %d failed (%s); %d chunk(s) were on it", slot.index, why[:300],
                    len(slot.chunks))
        out = [c for c, _ in slot.chunks.values()]
        for ref in slot.chunks:
            inflight.pop(ref, None)
        self._kill(slot)
        alone = len(out) == 1  # the only chunk on the replica: certainly the one that killed it
        for chunk in reversed(out):
            if alone and chunk.failures and len(chunk.requests) == 1:
                self.faults.poison_requests += 1
                log.error("teacher request %s killed a replica twice on its own: returned as an error",
                          chunk.requests[0].request_id)
                self._deliver(chunk.requests, [failed(chunk.requests[0], f"isolated: this request kills the "
                                                      f"teacher engine ({why})", retryable=False)])
                continue
            parts = chunk.halves() if alone and len(chunk.requests) > 1 else [chunk]
            for part in reversed(parts):
                part.failures = max(part.failures, 1) if alone else part.failures + 1
                queue.appendleft(part)
                self.faults.retried_chunks += 1
                self.faults.retried_requests += len(part.requests)
        if slot.restarts < self.cfg.max_restarts:
            slot.restarts += 1
            self.faults.restarts += 1
            self._launch(slot)
        else:
            slot.dead = True
            log.error("teacher replica %d is out of restarts (teacher.max_restarts=%d)", slot.index,
                      self.cfg.max_restarts)

    # ------------------------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Stop every replica and free its resources. Idempotent."""
        closing = [s.actor.close.remote() for s in self._slots if s.ready]
        if closing:
            ray.wait(closing, num_returns=len(closing), timeout=30)
        for s in self._slots:
            if s.actor is not None:
                self._kill(s)
