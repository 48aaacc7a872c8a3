"""Pytest plugin (loaded by conftest.py): a tiny teacher LLM built on the fly, no hub downloads.

`build_tiny_teacher(path)` is a plain function so benchmarks and other tests can reuse it. The model is a
random-weights Llama (2 layers, hidden 128, 2 heads of 64: vLLM's CPU build refuses head sizes below 32)
with a byte-level BPE tokenizer trained in well under a second on the repo's SST-2 validation texts, and a
ChatML-style chat template so `apply_chat_template` (and vLLM's `LLM.chat`) work. It writes gibberish, which
is all the plumbing tests need.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[1]
_TEXTS = _REPO / "data" / "sst2" / "validation.jsonl"

# ChatML, as SmolLM2 uses; no BOS in the template, and the tokenizer adds none either, so rendering the
# template and tokenizing with add_special_tokens=False (what vLLM's chat path does) gives the same ids.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _texts() -> list[str]:
    if _TEXTS.is_file():
        rows = [json.loads(line) for line in _TEXTS.read_text().splitlines() if line.strip()]
        texts = [r["text"] for r in rows]
    else:  # the repo copy of the data is missing: still build something usable
        texts = []
    return texts + ["You are a helpful assistant. Write a movie review. positive negative label:"] * 4


def build_tiny_teacher(path: str | Path, vocab_size: int = 1024, seed: int = 0) -> Path:
    """Write a tiny HF causal LM folder (tokenizer + random Llama, bf16 safetensors) to `path`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_texts(), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
        unk_token="<|endoftext|>",
        model_max_length=1024,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(path)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(hf_tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=1024,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.config.torch_dtype = torch.bfloat16
    model.generation_config.pad_token_id = hf_tok.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_teacher_dir(session_tmp) -> Path:
    """A tiny random Llama teacher folder, built once per test session (a few seconds)."""
    dest = Path(session_tmp) / "tiny-teacher"
    if not (dest / "config.json").is_file():
        build_tiny_teacher(dest)
    return dest


class OpenAITestServer:
    """A real OpenAI-compatible HTTP server on 127.0.0.1, for the HTTP backend's tests.

    `engine`: answer every chat completion with this real teacher engine (a request it rejects -> HTTP 400,
    as vLLM's server does). `script`: statuses to answer first, one per call (429, 503, or "slow": answer after
    1 s); once used up, answers come from `engine`, else a fixed "ok seed=<seed>" text. `calls` records every
    request body, `auth` every Authorization header.
    """

    def __init__(self, script: list | None = None, engine=None):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.script = list(script or [])
        self.engine = engine
        self.calls: list[dict] = []
        self.auth: list[str | None] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer._lock:
                    outer.calls.append(body)
                    outer.auth.append(self.headers.get("Authorization"))
                    step = outer.script.pop(0) if outer.script else 200
                if step == "slow":
                    threading.Event().wait(1.0)  # longer than the client's timeout in the tests
                    step = 200
                status, payload = (step, {"error": {"message": "try later"}}) if step != 200 else outer.answer(body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except BrokenPipeError:  # the client timed out ("slow") and hung up: expected
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, body: dict) -> tuple[int, dict]:
        if self.engine is None:
            text, usage = f"ok seed={body['seed']}", (5, 3)
            finish = "stop"
        else:
            from s3ray.teacher.types import GenerationRequest, Sampling

            req = GenerationRequest("http", tuple(body["messages"]), Sampling(
                temperature=body["temperature"], top_p=body["top_p"], max_tokens=body["max_tokens"],
                seed=body["seed"]))
            with self._lock:  # one generate at a time: same batches -> same samples
                (res,) = self.engine.generate([req])
            if not res.ok:
                return 400, {"error": {"message": res.error}}
            text, usage, finish = res.text, (res.prompt_tokens, res.output_tokens), res.finish_reason
        return 200, {"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                     "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]}}

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
