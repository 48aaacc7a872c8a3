"""Batched `model.generate` with left padding (transformers).

Reproducibility caveat: `generate` samples from the global torch RNG, one stream per batch. We seed it (inside
`fork_rng`, so the process RNG is untouched) from the seeds of the requests in that batch, so the same requests
batched the same way give the same texts; a request's text still depends on its batch mates and its position,
unlike vLLM where each request has its own generator.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from s3ray.config import TeacherConfig
from s3ray.teacher.engines.base import (
    Engine,
    check_sampling,
    failed,
    log_finished_calls,
    render_prompt,
    request_seed,
)
from s3ray.teacher.types import GenerationRequest, GenerationResult, derive_seed


class TransformersEngine(Engine):
    name = "transformers"

    def __init__(self, cfg: TeacherConfig, model_path: str, engine_seed: int) -> None:
        self.cfg = cfg
        self.engine_seed = engine_seed
        self.batch_size = cfg.transformers.batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=getattr(torch, cfg.dtype), trust_remote_code=cfg.trust_remote_code,
            **cfg.transformers.engine_args,
        ).to(self.device)
        self.model.eval()
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.stop_ids = {i for i in eos + [self.tokenizer.eos_token_id] if i is not None}
        self._lock = threading.Lock()  # one generate() at a time: concurrent calls gain nothing here

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        with self._lock:
            results = self._generate(requests)
        log_finished_calls(results)
        return results

    def _generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)
        # generate() takes one set of sampling parameters: batch requests that share them.
        groups: dict[tuple, list[tuple[int, str]]] = {}
        for i, req in enumerate(requests):
            try:
                check_sampling(req.sampling)
                text = render_prompt(self.tokenizer, req)
            except Exception as e:  # noqa: BLE001 - one bad request must not sink its batch
                results[i] = failed(req, e, retryable=False)
                continue
            s = req.sampling
            groups.setdefault((s.temperature, s.top_p, s.max_tokens, s.ignore_eos), []).append((i, text))
        for key, members in groups.items():
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                reqs = [requests[i] for i, _ in batch]
                try:
                    outs = self._generate_batch(reqs, [t for _, t in batch], *key)
                except Exception as e:  # noqa: BLE001
                    outs = [failed(r, e) for r in reqs]
                for (i, _), r in zip(batch, outs):
                    results[i] = r
        return results  # type: ignore[return-value]

    def _generate_batch(self, reqs, texts, temperature, top_p, max_tokens, ignore_eos) -> list[GenerationResult]:
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
