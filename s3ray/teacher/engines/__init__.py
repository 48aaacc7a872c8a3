"""Teacher engines, one module each: vllm (offline LLM), transformers (batched generate), openai (HTTP).

Importing this package imports no engine library; `make_engine` imports the one it builds.
"""

from __future__ import annotations

from s3ray.config import TeacherConfig
from s3ray.teacher.engines.base import Engine, render_prompt, render_prompt_ids, request_seed

__all__ = ["Engine", "make_engine", "render_prompt", "render_prompt_ids", "request_seed"]


def make_engine(cfg: TeacherConfig, model_path: str, engine_seed: int, **kwargs) -> Engine:
    """The engine named by `cfg.engine`; extra keyword arguments go to its constructor."""
    # Imported here: each module pulls in its heavy library (vLLM, torch, httpx) at import.
    if cfg.engine == "vllm":
        from s3ray.teacher.engines.vllm import VLLMEngine

        return VLLMEngine(cfg, model_path, engine_seed, **kwargs)
    if cfg.engine == "transformers":
        from s3ray.teacher.engines.transformers import TransformersEngine

        return TransformersEngine(cfg, model_path, engine_seed, **kwargs)
    if cfg.engine == "openai":
        from s3ray.teacher.engines.openai import OpenAIEngine

        return OpenAIEngine(cfg, model_path, engine_seed, **kwargs)
    raise ValueError(f"teacher.engine={cfg.engine!r}: use vllm, transformers or openai")
