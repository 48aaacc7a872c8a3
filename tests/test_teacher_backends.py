"""Backend conformance: the same tests through the `Teacher` facade over each backend on the tiny model -
Ray replicas (transformers engine), a local in-process engine (vLLM), and an HTTP endpoint (a real loopback
OpenAI-compatible server answering with the transformers engine). Plus the facade's bounded retries, model
identity in cache keys, and a vLLM step loop that fails without hanging."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from fixtures_teacher import OpenAITestServer

from s3ray.config import OpenAIConfig, TeacherConfig
from s3ray.teacher import Teacher, make_teacher
from s3ray.teacher.backends import Faults, local_backend
from s3ray.teacher.teacher import model_fingerprint, model_identity
from s3ray.teacher.types import GenerationRequest, Sampling

BACKENDS = ["ray", "local", "http"]


def _req(rid: str, content: str | None = None, seed: int | None = 1, **sampling) -> GenerationRequest:
    msg = {"role": "user", "content": content or f"Write a short movie review, {rid}."}
    return GenerationRequest(rid, (msg,), Sampling(max_tokens=6, seed=seed, **sampling))


class _Borrowed:
    """A module-wide backend lent to one test's Teacher: counts what that Teacher sends, and is not closed
    with it (starting engines for every test would dominate the suite's time)."""

    def __init__(self, backend):
        self.backend, self.sent, self.faults = backend, 0, Faults()

    def generate(self, requests, on_chunk=None):
        self.sent += len(requests)
        return self.backend.generate(requests, on_chunk)

    def close(self):
        pass


@pytest.fixture(scope="module")
def hf_server(tiny_teacher_dir):
    from s3ray.teacher.engines.transformers import TransformersEngine

    engine = TransformersEngine(TeacherConfig(engine="transformers", dtype="float32"), str(tiny_teacher_dir), 0)
    server = OpenAITestServer(engine=engine)
    yield server
    server.close()
    engine.close()


def _cfg(kind: str, url: str = "") -> TeacherConfig:
    if kind == "http":
        return TeacherConfig(engine="openai", openai=OpenAIConfig(base_url=url, concurrency=2, max_retries=0))
    if kind == "local":
        return TeacherConfig(engine="vllm", max_in_flight=8, vllm={"kv_cache_space_gb": 1, "max_model_len": 256})
    return TeacherConfig(engine="transformers", dtype="float32", max_in_flight=4)


@pytest.fixture(scope="module")
def backends(request, tiny_teacher_dir, hf_server):
    """One started backend per kind, built on first use and closed at the end of the module."""
    made: dict = {}

    def get(kind: str):
        if kind not in made:
            if kind == "ray":
                request.getfixturevalue("ray_local")
                from s3ray.teacher.ray_pool import RayReplicaPool

                made[kind] = RayReplicaPool(_cfg(kind), str(tiny_teacher_dir), run_seed=5, chunk_size=2)
            elif kind == "local":
                made[kind] = local_backend(_cfg(kind), str(tiny_teacher_dir), run_seed=5)
            else:
                from s3ray.teacher.backends import HttpBackend

                made[kind] = HttpBackend(_cfg(kind, hf_server.url), "tiny", run_seed=5)
        return made[kind]

    yield get
    for b in made.values():
        b.close()


def _teacher(kind, backends, hf_server, cache: Path | None, starts: list | None = None) -> Teacher:
    cfg = _cfg(kind, hf_server.url)

    def factory():
        if starts is not None:
            starts.append(kind)
        return _Borrowed(backends(kind))

    return Teacher(cfg, factory, "tiny", model_identity(cfg, "tiny", "tiny"), cache)


@pytest.mark.slow
@pytest.mark.parametrize("kind", BACKENDS)
def test_order_and_per_request_seeds(kind, backends, hf_server):
    reqs = [_req(f"o{i}", seed=100 + i) for i in range(5)]
    with _teacher(kind, backends, hf_server, None) as t1, _teacher(kind, backends, hf_server, None) as t2:
        out = t1.generate(reqs)
        again = t2.generate(list(reversed(reqs)))  # no cache: computed again
    assert [r.request_id for r in out] == [r.request_id for r in reqs]
    assert all(r.ok and 0 < r.output_tokens <= 6 for r in out), [r.error for r in out]
    assert len({r.text for r in out}) > 1  # different seeds, different samples
    by_id = {r.request_id: r.text for r in again}
    if kind != "ray":  # transformers samples per batch: only the same batches repeat (see its docstring)
        assert [by_id[r.request_id] for r in out] == [r.text for r in out]
    else:
        again_same_order = _teacher(kind, backends, hf_server, None).generate(reqs)
        assert [r.text for r in again_same_order] == [r.text for r in out]


@pytest.mark.slow
@pytest.mark.parametrize("kind", BACKENDS)
def test_failures_come_back_as_errors_and_are_never_cached(kind, backends, hf_server, tmp_path):
    good = [_req("f0"), _req("f1")]
    bad = _req("bad", temperature=-1.0)  # every engine (and vLLM's server) rejects it
    with _teacher(kind, backends, hf_server, tmp_path / "c.sqlite") as t:
        out = t.generate([good[0], bad, good[1]])
        assert [r.ok for r in out] == [True, False, True]
        assert "temperature" in out[1].error
        assert len(t.cache) == 2
        again = t.generate([good[0], bad, good[1]])
        st = t.stats()
    assert [r.cached for r in again] == [True, False, True] and not again[1].ok
    assert st.sent == 3 + 1 and st.failed == 2  # only the failed one was sent again


@pytest.mark.slow
@pytest.mark.parametrize("kind", BACKENDS)
def test_a_resumed_teacher_answers_from_cache_without_engine_calls(kind, backends, hf_server, tmp_path):
    reqs = [_req(f"c{i}", seed=i) for i in range(4)]
    with _teacher(kind, backends, hf_server, tmp_path / "c.sqlite") as first:
        done = first.generate(reqs[:3])  # "interrupted" before the last one
    starts: list = []
    calls_before = len(hf_server.calls)
    with _teacher(kind, backends, hf_server, tmp_path / "c.sqlite", starts) as resumed:
        cached = resumed.generate(reqs[:3])
        assert not resumed.started and starts == []  # no engine, replica or HTTP client was even started
        assert resumed.stats().sent == 0
        if kind == "http":
            assert len(hf_server.calls) == calls_before
        out = resumed.generate(reqs)
        st = resumed.stats()
    assert [r.text for r in cached] == [r.text for r in done] and all(r.cached for r in cached)
    assert [r.cached for r in out] == [True, True, True, False] and out[3].ok
    assert st.sent == 1 and st.cached == 6 and starts == [kind]


@pytest.mark.slow
@pytest.mark.parametrize("kind", BACKENDS)
def test_duplicate_calls_are_stored_once(kind, backends, hf_server, tmp_path):
    twin_a, twin_b = _req("twin-a", "Same prompt."), _req("twin-b", "Same prompt.")  # same call, two ids
    other = _req("other")
    with _teacher(kind, backends, hf_server, tmp_path / "c.sqlite") as t:
        t.generate([twin_a, twin_b, other])
        t.generate([twin_b, other, _req("twin-c", "Same prompt.")])
        st = t.stats()
        rows = len(t.cache)
    assert rows == 2  # one row per distinct (model, prompt, sampling with seed)
    assert st.sent == 3 and st.cached == 3 and st.duplicates_dropped == 0


# ------------------------------------------------------------------------------- facade: bounded retries


def test_failed_requests_are_retried_up_to_max_attempts(tmp_path):
    server = OpenAITestServer(script=[503, 503, 200, 503, 503, 503])
    cfg = TeacherConfig(engine="openai", max_attempts=3,
                        openai=OpenAIConfig(base_url=server.url, concurrency=1, max_retries=0))
    try:
        with make_teacher(cfg, "tiny", run_seed=0, cache_path=tmp_path / "c.sqlite") as t:
            (saved,) = t.generate([_req("a")])  # fails twice, then succeeds on its third attempt
            (lost,) = t.generate([_req("b")])  # fails three times: an error, not cached
            st = t.stats()
            rows = len(t.cache)
            t.release()  # frees the backend; the next uncached request starts a new one
            assert not t.started and t.generate([_req("a")])[0].cached and not t.started
            assert t.generate([_req("c")])[0].ok and t.started
            after = t.stats()
    finally:
        server.close()
    assert saved.ok and saved.text == "ok seed=1"
    assert not lost.ok and "503" in lost.error
    assert len(server.calls) == 7 and st.retries == 4 and st.failed == 1 and rows == 1
    assert after.backend_starts == 2 and after.sent == 7  # counters of the released backend are kept


# ------------------------------------------------------------------------------- facade: model identity


def test_cache_identity_follows_the_model_and_endpoint(tiny_teacher_dir, tmp_path):
    import shutil

    copy = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, copy)
    fp = model_fingerprint(str(copy))
    assert fp and fp == model_fingerprint(str(tiny_teacher_dir))  # content, not location
    cfg_json = (copy / "config.json").read_text()
    (copy / "config.json").write_text(cfg_json.replace('"num_hidden_layers": 2', '"num_hidden_layers": 3'))
    assert model_fingerprint(str(copy)) != fp
    hf = TeacherConfig(engine="transformers")
    assert model_identity(hf, "m", str(tiny_teacher_dir)) == f"transformers:m#{fp}"
    a = TeacherConfig(engine="openai", openai=OpenAIConfig(base_url="https://u:secret@a.example/v1"))
    b = TeacherConfig(engine="openai", openai=OpenAIConfig(base_url="https://b.example/v1"))
    assert model_identity(a, "m", "m") == "openai:m@https://***@a.example/v1"  # no credentials in keys
    assert model_identity(a, "m", "m") != model_identity(b, "m", "m")


# ------------------------------------------------------------------------------- vLLM: a failing step loop


@pytest.mark.slow
def test_a_failing_vllm_step_loop_fails_every_caller_and_the_engine_is_rebuilt(backends, hf_server):
    """An exception in the step loop outside `engine.step()` (here: delivering outputs) breaks the engine and
    wakes every waiting caller with an error - no hang; the local backend then builds a new engine and the
    facade's retry succeeds. Runs last among the local tests: it replaces the module's local engine."""
    local = backends("local")
    engine = local.engine

    def broken_delivery(outs):
        raise KeyError("bookkeeping failed")

    engine._deliver = broken_delivery  # our own code, not vLLM's
    box: dict = {}
    caller = threading.Thread(target=lambda: box.update(out=_safe_generate(engine, [_req("s0"), _req("s1")])))
    caller.start()
    caller.join(timeout=300)
    assert not caller.is_alive(), "a caller hung on a broken engine"
    assert isinstance(box["out"], RuntimeError) and "bookkeeping failed" in str(box["out"])
    assert "bookkeeping failed" in engine.broken
    with _teacher("local", backends, hf_server, None) as t:
        t.cfg = t.cfg.model_copy(update={"max_attempts": 2})
        out = t.generate([_req("s2"), _req("s3")])
        st = t.stats()
    assert all(r.ok for r in out), [r.error for r in out]
    assert local.faults.restarts == 1 and local.engine is not engine and st.retries == 2


def _safe_generate(engine, reqs):
    try:
        return engine.generate(reqs)
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return e
