"""Teacher engines on the tiny model: transformers generate, and the OpenAI client against real local
servers (a vLLM OpenAI server, and a small loopback HTTP server that answers 429/503/slowly)."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from s3ray.config import OpenAIConfig, TeacherConfig
from s3ray.teacher.engines import OpenAIEngine, TransformersEngine, make_engine, request_seed
from s3ray.teacher.types import GenerationRequest, Sampling, derive_seed


def _req(rid: str, content: str = "Write a short movie review.", **sampling) -> GenerationRequest:
    return GenerationRequest(rid, ({"role": "user", "content": content},), Sampling(**sampling))


def test_request_seed_derivation():
    assert request_seed(_req("a", seed=7), engine_seed=1) == 7
    assert request_seed(_req("a"), 1) == derive_seed(1, "a")
    assert request_seed(_req("a"), 1) != request_seed(_req("a"), 2)  # replicas differ
    assert request_seed(_req("a"), 1) != request_seed(_req("b"), 1)


# ------------------------------------------------------------------------------------- transformers


@pytest.fixture(scope="module")
def hf_engine(tiny_teacher_dir):
    cfg = TeacherConfig(engine="transformers", batch_size=4, dtype="float32")
    eng = make_engine(cfg, str(tiny_teacher_dir), engine_seed=11)
    assert isinstance(eng, TransformersEngine)
    yield eng
    eng.close()


def test_transformers_engine_generates(hf_engine):
    reqs = [_req(f"r{i}", f"review number {i}", max_tokens=12, seed=i) for i in range(6)]
    reqs.append(_req("fixed", max_tokens=10, ignore_eos=True, seed=1))
    out = hf_engine.generate(reqs)
    assert [r.request_id for r in out] == [r.request_id for r in reqs]
    assert all(r.ok for r in out), [r.error for r in out]
    assert all(0 < r.output_tokens <= 12 and r.prompt_tokens > 5 for r in out)
    assert out[-1].output_tokens == 10 and out[-1].finish_reason == "length"
    assert len({r.text for r in out[:6]}) > 1
    # Same requests, same batching -> same samples (seeded per batch).
    again = hf_engine.generate(reqs)
    assert [r.text for r in again] == [r.text for r in out]


def test_transformers_engine_isolates_a_bad_request(hf_engine):
    bad = GenerationRequest("bad", ({"role": "user"},), Sampling(max_tokens=4, seed=1))  # no content
    out = hf_engine.generate([_req("good", max_tokens=4, seed=1), bad])
    assert out[0].ok and out[0].text
    assert not out[1].ok and out[1].error


# ---------------------------------------------------------------------- OpenAI client: retry logic


class _FlakyServer:
    """A real HTTP server on 127.0.0.1 whose answers follow a script: one status (or 'slow') per call."""

    def __init__(self, script: list):
        self.script = list(script)
        self.calls: list[dict] = []
        self.auth: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.calls.append(body)
                outer.auth.append(self.headers.get("Authorization"))
                step = outer.script.pop(0) if outer.script else 200
                if step == "slow":
                    threading.Event().wait(1.0)  # longer than the client's timeout
                    step = 200
                if step != 200:
                    self.send_response(step)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(b'{"error": {"message": "try later"}}')
                    return
                payload = json.dumps({
                    "choices": [{"message": {"role": "assistant", "content": f"ok seed={body['seed']}"},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 3},
                }).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except BrokenPipeError:  # the client timed out ("slow") and hung up: expected
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _openai_engine(url: str, max_retries: int, timeout_s: float = 10.0, key_env: str = "S3RAY_TEST_KEY"):
    cfg = TeacherConfig(engine="openai", openai=OpenAIConfig(
        base_url=url, max_retries=max_retries, concurrency=2, timeout_s=timeout_s, api_key_env=key_env))
    return OpenAIEngine(cfg, "tiny", engine_seed=3, backoff_base_s=0.01, backoff_max_s=0.05)


def test_openai_retries_429_then_succeeds(monkeypatch, caplog):
    secret = "sk-test-SECRET-123"
    monkeypatch.setenv("S3RAY_TEST_KEY", secret)
    server = _FlakyServer([429, 429, 200])
    eng = _openai_engine(server.url, max_retries=3)
    try:
        with caplog.at_level(logging.DEBUG):
            (res,) = eng.generate([_req("a", seed=42)])
    finally:
        eng.close()
        server.close()
    assert res.ok and res.text == "ok seed=42"
    assert (res.prompt_tokens, res.output_tokens, res.finish_reason) == (5, 3, "stop")
    assert len(server.calls) == 3 and eng.retries == 2
    assert server.calls[0]["seed"] == 42 and server.calls[0]["model"] == "tiny"
    assert server.auth == [f"Bearer {secret}"] * 3
    assert secret not in caplog.text and secret not in repr(res)


def test_openai_gives_up_after_max_retries_and_does_not_retry_4xx():
    server = _FlakyServer([503, 503, 503, 400])
    eng = _openai_engine(server.url, max_retries=2)
    try:
        (gave_up,) = eng.generate([_req("a")])
        (bad_request,) = eng.generate([_req("b")])
    finally:
        eng.close()
        server.close()
    assert not gave_up.ok and "gave up after 2 retries" in gave_up.error and "503" in gave_up.error
    assert not bad_request.ok and "HTTP 400" in bad_request.error
    assert len(server.calls) == 4  # 3 tries for "a", exactly one for "b"
    assert server.calls[0]["seed"] == derive_seed(3, "a")  # seed=None: derived from the engine seed


def test_openai_retries_timeouts():
    server = _FlakyServer(["slow", 200])
    eng = _openai_engine(server.url, max_retries=2, timeout_s=0.3)
    try:
        (res,) = eng.generate([_req("a", seed=1)])
    finally:
        eng.close()
        server.close()
    assert res.ok and eng.retries == 1


def test_openai_unreachable_is_an_error_result():
    from s3ray.teacher.serve import free_port

    eng = _openai_engine(f"http://127.0.0.1:{free_port()}/v1", max_retries=1)
    try:
        (res,) = eng.generate([_req("a")])
    finally:
        eng.close()
    assert not res.ok and "ConnectError" in res.error


# ------------------------------------------------------------------ OpenAI client vs a real vLLM server


@pytest.fixture(scope="module")
def vllm_server(tiny_teacher_dir, session_tmp):
    from s3ray.teacher.serve import running_server

    cfg = TeacherConfig(engine="openai", kv_cache_space_gb=1, max_model_len=512)
    with running_server(cfg, str(tiny_teacher_dir), log_path=session_tmp / "vllm_server.log") as url:
        yield cfg, url


@pytest.mark.slow
def test_openai_engine_against_local_vllm_server(vllm_server, tiny_teacher_dir):
    cfg, url = vllm_server
    cfg = cfg.model_copy(update={"openai": OpenAIConfig(base_url=url, concurrency=4, max_retries=1)})
    eng = OpenAIEngine(cfg, str(tiny_teacher_dir), engine_seed=5)
    try:
        reqs = [_req(f"r{i}", max_tokens=8) for i in range(5)] + [_req("fixed", max_tokens=6, ignore_eos=True, seed=9)]
        out = eng.generate(reqs)
        again = eng.generate([reqs[-1], reqs[0]])
    finally:
        eng.close()
    assert [r.request_id for r in out] == [r.request_id for r in reqs]
    assert all(r.ok for r in out), [r.error for r in out]
    assert all(0 < r.output_tokens <= 8 and r.prompt_tokens > 5 for r in out)
    assert out[-1].output_tokens == 6
    assert len({r.text for r in out[:5]}) > 1  # derived per-request seeds differ
    assert again[0].text == out[-1].text and again[1].text == out[0].text  # seeds reach the server


@pytest.mark.slow
def test_pool_with_openai_engine_runs_in_the_driver(vllm_server, tiny_teacher_dir, tmp_path):
    from s3ray.teacher.pool import TeacherPool

    cfg, url = vllm_server
    cfg = cfg.model_copy(update={"openai": OpenAIConfig(base_url=url, concurrency=3, max_retries=1)})
    reqs = [_req(f"p{i}", f"review {i}", max_tokens=6, seed=i) for i in range(7)]
    with TeacherPool(cfg, str(tiny_teacher_dir), run_seed=1, cache_path=tmp_path / "c.sqlite") as pool:
        out = pool.generate(reqs)
        again = pool.generate(reqs)
        st = pool.stats()
    assert [r.request_id for r in out] == [r.request_id for r in reqs] and all(r.ok for r in out)
    assert all(r.cached for r in again) and [r.text for r in again] == [r.text for r in out]
    assert st["sent"] == 7 and st["cached"] == 7
