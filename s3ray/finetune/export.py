"""Export for serving, no manual step: the fine-tuned teacher as a standard HF folder (16-bit safetensors,
tokenizer with its chat template, config) that `teacher.model` and every engine of the teacher pool load, or a
LoRA adapter folder next to its base.

ZeRO-3 weights are gathered from every rank (a collective) into one 16-bit state dict; LoRA adapters are
merged into the base weights (`merge_and_unload`) unless `lora.export=adapter`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

META_FILE = "s3ray_teacher.json"
ADAPTER_DIR = "adapter"


def export_from_worker(engine, config: dict, rank: int, history: list) -> None:
    """Every rank calls this after the last step; rank 0 writes the folder and reports it as the run's
    final Ray Train checkpoint."""
    import ray.train
    from transformers import AutoTokenizer

    from s3ray.finetune.formats import template_of

    t = config["training"]
    if t["zero_stage"] == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank takes part
    else:
        state = None
    if rank != 0:
        ray.train.report({"step": history[-1]["step"] if history else 0, "exported": 1})
        return
    with tempfile.TemporaryDirectory(prefix="s3ray-ft-export-") as d:
        module = engine.module
        if t["method"] == "lora":
            # The adapter always (adapter_config.json + adapter_model.safetensors, for LoRA serving on the
            # base), and the merged weights beside it unless only the adapter is wanted.
            module.save_pretrained(Path(d) / ADAPTER_DIR)
            if config["lora"]["export"] == "merged":
                module.merge_and_unload().save_pretrained(d, safe_serialization=True)
        else:
            module.save_pretrained(d, state_dict=state, safe_serialization=True)
        tok = AutoTokenizer.from_pretrained(config["model_path"])
        tok.chat_template = template_of(tok)  # a base model's export carries the layout it was trained on
        tok.save_pretrained(d)
        meta = {"base_model": config["model_path"], "method": t["method"], "format": t["format"],
                "lora_export": config["lora"]["export"] if t["method"] == "lora" else None,
                "task": config["task_meta"], "history": history}
        Path(d, META_FILE).write_text(json.dumps(meta, indent=1))
        ray.train.report({"step": history[-1]["step"] if history else 0, "exported": 1},
                         checkpoint=ray.train.Checkpoint.from_directory(d))


def read_meta(folder: str | Path) -> dict:
    p = Path(folder) / META_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


def is_adapter(folder: str | Path) -> bool:
    """True when the folder holds only a LoRA adapter (no merged weights to serve on their own)."""
    return not (Path(folder) / "config.json").is_file() and (Path(folder) / ADAPTER_DIR).is_dir()
