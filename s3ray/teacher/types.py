"""The teacher's request/response records, shared by every engine and the pool."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.9
    top_p: float = 0.95
    max_tokens: int = 64
    # None: the engine derives one from (run seed, replica). Set: the exact per-request seed.
    seed: int | None = None
    # Benchmarks only: generate exactly max_tokens (vLLM ignore_eos + min_tokens) so runs compare.
    ignore_eos: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["ignore_eos"]:  # keep cache keys of ordinary requests independent of this later field
            del d["ignore_eos"]
        return d


@dataclass(frozen=True)
class GenerationRequest:
    """One chat completion. `request_id` is unique within a run and stable across resumes."""

    request_id: str
    messages: tuple[Message, ...]
    sampling: Sampling = field(default_factory=Sampling)

    def prompt_hash(self) -> str:
        """Hash of the prompt alone (messages), for provenance columns."""
        return hashlib.sha256(json.dumps(list(self.messages), sort_keys=True).encode()).hexdigest()[:16]

    def cache_key(self, model: str) -> str:
        """Content address of this call: same model, prompt and sampling (seed included) -> same key."""
        payload = {"model": model, "messages": list(self.messages), "sampling": self.sampling.to_dict()}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass
class GenerationResult:
    request_id: str
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None  # set when the call failed; failed results are never cached
    cached: bool = False
    replica: int | None = None
    # False when trying again cannot help (a prompt too long, a rejected parameter, a poison request).
    retryable: bool = True

    @property
    def ok(self) -> bool:
        return self.error is None


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from any parts (run seed, replica, request id); stable across processes."""
    h = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


class TeacherError(RuntimeError):
    """The teacher cannot finish: replicas out of restarts, none could start, or a deadline passed."""
