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


_GOOD = ["wonderful", "great", "superb", "lovely", "brilliant", "delightful"]
_BAD = ["awful", "terrible", "dull", "boring", "dreadful", "tedious"]
_NOUNS = ["movie", "film", "story", "cast", "script", "ending", "plot", "score"]


def keyword_rows(n: int, offset: int = 0) -> list[dict]:
    """Sentiment rows whose label a tiny model can learn in a few steps: one telling adjective per text."""
    rows = []
    for i in range(offset, offset + n):
        good = i % 2 == 0
        adj = (_GOOD if good else _BAD)[(i // 2) % 6]
        noun = _NOUNS[(i // 12 + i) % len(_NOUNS)]
        rows.append({"text": f"the {noun} was {adj} .", "label": "positive" if good else "negative"})
    return rows


_VLLM_SCRIPT = """
import json, sys
if __name__ == "__main__":  # vLLM spawns processes
    from vllm import LLM, SamplingParams
    a = json.loads(sys.argv[1])
    extra = {"enable_lora": True, "max_lora_rank": a["rank"]} if a.get("lora") else {}
    llm = LLM(model=a["model"], dtype="bfloat16", enforce_eager=True, gpu_memory_utilization=0.5,
              max_model_len=512, seed=0, enable_chunked_prefill=False, max_num_batched_tokens=4096, **extra)
    req = None
    if a.get("lora"):
        from vllm.lora.request import LoRARequest
        req = LoRARequest("finetuned", 1, a["lora"])
    outs = llm.generate([{"prompt_token_ids": p} for p in a["prompts"]],
                        SamplingParams(temperature=0.0, max_tokens=8), lora_request=req)
    print("S3RAY_OUT" + json.dumps([o.outputs[0].text for o in outs]))
"""


def vllm_greedy(model_dir, prompts: list[list[int]], lora_dir=None, lora_rank: int = 8) -> list[str]:
    """Greedy completions from vLLM's offline engine (CPU build) in a fresh process, as a server would."""
    import os
    import subprocess
    import sys

    args = {"model": str(model_dir), "prompts": prompts, "lora": str(lora_dir) if lora_dir else None,
            "rank": lora_rank}
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    out = subprocess.run([sys.executable, "-c", _VLLM_SCRIPT, json.dumps(args)], capture_output=True, text=True,
                         env=env, timeout=400, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("S3RAY_OUT"):
            return json.loads(line[len("S3RAY_OUT"):])
    raise RuntimeError(f"vLLM run failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
