"""Chat completions against an OpenAI-compatible endpoint (a vLLM server, or a hosted API).

`concurrency` requests in flight at once (threads, each a blocking httpx call, so it also works inside a running
event loop or a Ray actor), retries with exponential backoff and full jitter on 429/5xx/timeouts (honouring
Retry-After), and a per-request timeout. The API key is read from the environment variable named by
`openai.api_key_env` and only ever placed in the Authorization header, never logged or returned. The model name
sent is `model_path` (a vLLM server names its model after the `--model` argument).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx

from s3ray.config import TeacherConfig
from s3ray.redact import redact_url
from s3ray.teacher.engines.base import Engine, error_text, failed, log_finished_calls, request_seed
from s3ray.teacher.types import GenerationRequest, GenerationResult

__all__ = ["OpenAIEngine", "redact_url"]

# httpx logs every request URL at INFO; a URL may carry credentials (user:pass@host).
logging.getLogger("httpx").setLevel(logging.WARNING)

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class OpenAIEngine(Engine):
    name = "openai"

    def __init__(self, cfg: TeacherConfig, model_path: str, engine_seed: int, backoff_base_s: float = 1.0,
                 backoff_max_s: float = 60.0) -> None:
        self.cfg = cfg
        self.model = model_path
        self.engine_seed = engine_seed
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._rng = random.Random(engine_seed)
        self._lock = threading.Lock()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(cfg.openai.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        n = cfg.openai.concurrency
        self._client = httpx.Client(base_url=cfg.openai.base_url.rstrip("/"), headers=headers,
                                    timeout=cfg.openai.timeout_s,
                                    limits=httpx.Limits(max_connections=n, max_keepalive_connections=n))
        self._pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="s3ray-openai")
        self.retries = 0  # total retries made (for stats and tests)

    def _payload(self, req: GenerationRequest) -> dict:
        s = req.sampling
        payload = {"model": self.model, "messages": list(req.messages), "temperature": s.temperature,
                   "top_p": s.top_p, "max_tokens": s.max_tokens, "seed": request_seed(req, self.engine_seed)}
        if s.ignore_eos:  # vLLM extensions, for fixed-length benchmarks; hosted APIs reject them
            payload.update(ignore_eos=True, min_tokens=s.max_tokens)
        return payload

    def _sleep_for(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(float(retry_after), self.backoff_max_s)
            except ValueError:
                pass
        with self._lock:
            jitter = self._rng.random()
        return jitter * min(self.backoff_max_s, self.backoff_base_s * (2**attempt))  # full jitter

    def _one(self, req: GenerationRequest) -> GenerationResult:
        payload = self._payload(req)
        last = "no attempt made"
        max_retries = self.cfg.openai.max_retries
        for attempt in range(max_retries + 1):
            retry_after = None
            try:
                resp = self._client.post("/chat/completions", json=payload)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                last = f"{type(e).__name__} after {attempt + 1} attempt(s)"  # no URL: it may hold credentials
            else:
                if resp.status_code == 200:
                    return self._parse(req, resp)
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                if resp.status_code not in RETRY_STATUS:  # the server rejected the request itself
                    return failed(req, last, retryable=False)
                retry_after = resp.headers.get("retry-after")
            if attempt < max_retries:
                with self._lock:
                    self.retries += 1
                time.sleep(self._sleep_for(attempt, retry_after))
        return failed(req, f"gave up after {max_retries} retries: {last}")

    @staticmethod
    def _parse(req: GenerationRequest, resp) -> GenerationResult:
        try:
            body = resp.json()
            choice = body["choices"][0]
            usage = body.get("usage") or {}
            return GenerationResult(req.request_id, text=choice["message"].get("content") or "",
                                    finish_reason=choice.get("finish_reason"),
                                    prompt_tokens=int(usage.get("prompt_tokens") or 0),
                                    output_tokens=int(usage.get("completion_tokens") or 0))
        except Exception as e:  # noqa: BLE001 - a malformed body is a failed call, not a crash
            return failed(req, f"malformed response: {error_text(e)}")

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        results = list(self._pool.map(self._one, requests))
        log_finished_calls(results)
        return results

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()
