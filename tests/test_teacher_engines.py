"""Teacher engines on the tiny model: transformers generate, and the OpenAI client against real local
servers (a vLLM OpenAI server, and the loopback test server that answers 429/503/slowly); `s3ray serve`."""

from __future__ import annotations

import logging

import pytest
from fixtures_teacher import OpenAITestServer

from s3ray.config import OpenAIConfig, TeacherConfig
from s3ray.redact import redact_url
from s3ray.teacher.engines import make_engine, request_seed
from s3ray.teacher.engines.openai import OpenAIEngine
from s3ray.teacher.engines.transformers import TransformersEngine
from s3ray.teacher.serve import api_key_env_vars, server_command
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
    cfg = TeacherConfig(engine="transformers", transformers={"batch_size": 4}, dtype="float32")
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
    assert not out[1].ok and out[1].error and not out[1].retryable


# ---------------------------------------------------------------------- OpenAI client: retry logic


def _openai_engine(url: str, max_retries: int, timeout_s: float = 10.0, key_env: str = "S3RAY_TEST_KEY"):
    cfg = TeacherConfig(engine="openai", openai=OpenAIConfig(
        base_url=url, max_retries=max_retries, concurrency=2, timeout_s=timeout_s, api_key_env=key_env))
    return OpenAIEngine(cfg, "tiny", engine_seed=3, backoff_base_s=0.01, backoff_max_s=0.05)


def test_openai_retries_429_then_succeeds(monkeypatch, caplog):
    secret = "sk-test-SECRET-123"
    monkeypatch.setenv("S3RAY_TEST_KEY", secret)
    server = OpenAITestServer([429, 429, 200])
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
    server = OpenAITestServer([503, 503, 503, 400])
    eng = _openai_engine(server.url, max_retries=2)
    try:
        (gave_up,) = eng.generate([_req("a")])
        (bad_request,) = eng.generate([_req("b")])
    finally:
        eng.close()
        server.close()
    assert not gave_up.ok and "gave up after 2 retries" in gave_up.error and "503" in gave_up.error
    assert gave_up.retryable  # the server may recover: the Teacher tries it again (teacher.max_attempts)
    assert not bad_request.ok and "HTTP 400" in bad_request.error and not bad_request.retryable
    assert len(server.calls) == 4  # 3 tries for "a", exactly one for "b"
    assert server.calls[0]["seed"] == derive_seed(3, "a")  # seed=None: derived from the engine seed


def test_openai_retries_timeouts():
    server = OpenAITestServer(["slow", 200])
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


_SERVE_KEY_ENV = "S3RAY_TEST_SERVE_KEY"


@pytest.fixture(scope="module")
def vllm_server(tiny_teacher_dir, session_tmp):
    """`s3ray serve`'s server on the tiny model, requiring an API key (read from an environment variable)."""
    import os

    from s3ray.teacher.serve import running_server

    os.environ[_SERVE_KEY_ENV] = "sk-serve-test-key"
    cfg = TeacherConfig(engine="openai", vllm={"kv_cache_space_gb": 1, "max_model_len": 512},
                        openai=OpenAIConfig(api_key_env=_SERVE_KEY_ENV))
    with running_server(cfg, str(tiny_teacher_dir), log_path=session_tmp / "vllm_server.log",
                        api_key_env=_SERVE_KEY_ENV) as url:
        yield cfg, url


@pytest.mark.slow
def test_openai_engine_against_local_vllm_server(vllm_server, tiny_teacher_dir):
    cfg, url = vllm_server
    cfg = cfg.model_copy(update={"openai": cfg.openai.model_copy(update={"base_url": url, "concurrency": 4,
                                                                          "max_retries": 1})})
    eng = OpenAIEngine(cfg, str(tiny_teacher_dir), engine_seed=5)
    nokey = OpenAIEngine(cfg.model_copy(update={"openai": cfg.openai.model_copy(
        update={"api_key_env": "S3RAY_TEST_NO_SUCH_VAR"})}), str(tiny_teacher_dir), engine_seed=5)
    try:
        reqs = [_req(f"r{i}", max_tokens=8) for i in range(5)] + [_req("fixed", max_tokens=6, ignore_eos=True, seed=9)]
        out = eng.generate(reqs)
        again = eng.generate([reqs[-1], reqs[0]])
        (denied,) = nokey.generate([reqs[0]])
    finally:
        eng.close()
        nokey.close()
    assert [r.request_id for r in out] == [r.request_id for r in reqs]
    assert all(r.ok for r in out), [r.error for r in out]
    assert all(0 < r.output_tokens <= 8 and r.prompt_tokens > 5 for r in out)
    assert out[-1].output_tokens == 6
    assert len({r.text for r in out[:5]}) > 1  # derived per-request seeds differ
    assert again[0].text == out[-1].text and again[1].text == out[0].text  # seeds reach the server
    assert not denied.ok and "HTTP 401" in denied.error  # the server requires the key


# ------------------------------------------------------------------------------- serve: keys and URLs


def test_serve_takes_the_key_from_a_variable_and_warns_without_one(monkeypatch, caplog):
    monkeypatch.setenv("S3RAY_TEST_KEY", "sk-abc")
    assert api_key_env_vars("S3RAY_TEST_KEY", "0.0.0.0") == {"VLLM_API_KEY": "sk-abc"}
    monkeypatch.delenv("S3RAY_TEST_KEY")
    with pytest.raises(ValueError, match="S3RAY_TEST_KEY"):
        api_key_env_vars("S3RAY_TEST_KEY", "127.0.0.1")
    with caplog.at_level(logging.WARNING, logger="s3ray.teacher"):
        assert api_key_env_vars(None, "127.0.0.1") == {}
        assert "without an API key" not in caplog.text
        assert api_key_env_vars(None, "0.0.0.0") == {}
    assert "0.0.0.0 without an API key" in caplog.text
    cmd = server_command(TeacherConfig(vllm={"engine_args": {"max_num_seqs": 8, "enable_prefix_caching": False}}),
                         "/m", "127.0.0.1", 8000)
    assert cmd[cmd.index("--max-num-seqs") + 1] == "8" and "--no-enable-prefix-caching" in cmd
    assert "sk-abc" not in " ".join(cmd)


def test_redact_url_drops_credentials():
    assert redact_url("https://user:s3cret@api.example.com:8443/v1?key=abc") == "https://***@api.example.com:8443/v1?key=***"
    assert redact_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"
    cfg = TeacherConfig(engine="openai", openai=OpenAIConfig(base_url="https://user:s3cret@api.example.com/v1"))
    assert "s3cret" not in cfg.model_dump_json() and "s3cret" not in str(cfg.model_dump(mode="json"))
    assert cfg.openai.base_url.startswith("https://user:s3cret@")  # the client itself still has it
