"""The student checkpoint format: a Hugging Face folder plus `s3ray_student.json`.

finetune:        the fine-tuned AutoModelForSequenceClassification or AutoModelForQuestionAnswering,
                 plus its tokenizer.
embedding_head:  the (frozen) encoder as a plain AutoModel + tokenizer + `head.safetensors` (linear head over
                 mean-pooled token embeddings). Never pickles: weights are safetensors, metadata is JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

META_FILE = "s3ray_student.json"
HEAD_FILE = "head.safetensors"
FORMAT = "s3ray-student"
VERSION = 1


def write_meta(
    folder: str | Path,
    *,
    kind: str,
    task_type: str,
    labels: list[str] | None,
    max_length: int,
    base_model: str,
    **extra: Any,
) -> dict:
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "task_type": task_type,
        "labels": list(labels) if labels is not None else None,
        "max_length": int(max_length),
        "base_model": str(base_model),
        **extra,
    }
    (Path(folder) / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    return meta


def read_meta(folder: str | Path) -> dict:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} is not an s3ray student checkpoint (no {META_FILE}); pass TrainResult.checkpoint"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(
            f"{path}: unsupported student checkpoint format {meta.get('format')} v{meta.get('version')}"
        )
    return meta
