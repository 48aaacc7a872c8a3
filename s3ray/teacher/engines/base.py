"""What every teacher engine shares: the interface, request seeds, prompt rendering, sampling checks."""

from __future__ import annotations

import os
from collections.abc import Sequence

from s3ray.teacher.types import GenerationRequest, GenerationResult, Sampling, derive_seed


class Engine:
    """One teacher back end: results in request order; a bad request comes back with `.error`, never raises."""

    name: str = "engine"

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        raise NotImplementedError

    def close(self) -> None:
        """Free the engine's memory/processes. Idempotent."""


# Opt-in audit trail for exactly-once tests: the path of a file to which every engine, in whatever process it
# runs, appends one line per request it finished generating ("<request_id>\t<pid>").
CALL_LOG_ENV = "S3RAY_ENGINE_CALL_LOG"


def log_finished_calls(results: Sequence[GenerationResult]) -> None:
    """Append the ids of the successful `results` to the call log named by $S3RAY_ENGINE_CALL_LOG, if set.
    One O_APPEND write per call, so lines from concurrent processes never interleave, and nothing is buffered
    that a SIGKILL could lose after the engine returned."""
    path = os.environ.get(CALL_LOG_ENV)
    lines = "".join(f"{r.request_id}\t{os.getpid()}\n" for r in results if r.ok)
    if not path or not lines:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, lines.encode())
    finally:
        os.close(fd)


def request_seed(req: GenerationRequest, engine_seed: int) -> int:
    """The request's own seed, else one derived from (engine seed, request id).

    Every replica has its own engine seed, so two replicas never repeat each other's samples (vLLM #11953:
    with a shared engine seed and no per-request seed, identical replicas return identical "random" samples).
    """
    if req.sampling.seed is not None:
        return int(req.sampling.seed)
    return derive_seed(engine_seed, req.request_id)


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:500]


def failed(req: GenerationRequest, e: BaseException | str, retryable: bool = True) -> GenerationResult:
    return GenerationResult(req.request_id, error=e if isinstance(e, str) else error_text(e), retryable=retryable)


def check_sampling(s: Sampling) -> None:
    """The ranges every engine accepts (vLLM's own checks), so all engines reject the same requests."""
    if s.temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {s.temperature}")
    if not 0 < s.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {s.top_p}")
    if s.max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {s.max_tokens}")


def render_prompt(tokenizer, req: GenerationRequest) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the teacher's tokenizer has no chat template; use an instruction-tuned model "
            "(teacher.model) whose tokenizer_config.json defines chat_template"
        )
    return tokenizer.apply_chat_template(list(req.messages), tokenize=False, add_generation_prompt=True)


def render_prompt_ids(tokenizer, req: GenerationRequest) -> list[int]:
    """Chat template -> text -> ids, without adding special tokens twice (the template has them)."""
    text = render_prompt(tokenizer, req)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])

