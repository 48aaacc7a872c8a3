"""A tiny GPT-NeoX teacher for the fine-tune tests (imported by tests/test_finetune_*.py): the fixtures'
byte-level BPE tokenizer and ChatML template, and a random GPTNeoXForCausalLM with head size 32 (vLLM's CPU
build refuses smaller heads). Plain functions, so the benchmark builds the same model."""

from __future__ import annotations

import json
from pathlib import Path

from fixtures_teacher import build_tiny_teacher

_REPO = Path(__file__).resolve().parents[1]


def build_tiny_neox(path: str | Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    path = Path(path)
    build_tiny_teacher(path, seed=seed)  # tokenizer (and a Llama we replace)
    for f in path.glob("model*.safetensors"):
        f.unlink()
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        max_position_embeddings=512, rotary_pct=1.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    model = GPTNeoXForCausalLM(cfg).to(torch.bfloat16)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    return path


def sst2_rows(n: int, offset: int = 0) -> list[dict]:
    rows = [json.loads(x) for x in (_REPO / "data/sst2/validation.jsonl").read_text().splitlines() if x.strip()]
    return [{"text": r["text"], "label": r["label"]} for r in rows[offset : offset + n]]
