"""The student: training (Ray Train: DDP or DeepSpeed ZeRO; or a fast frozen-embedding head), evaluation,
and a predictor for Ray Data error mining. The checkpoint format is described in checkpoint.py.

Names are imported lazily so that importing a submodule (Ray Train's controller unpickles
`s3ray.student.worker.train_loop`) does not import torch and transformers."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = [
    "META_FILE", "EvalResult", "StudentPredictor", "TrainResult", "evaluate_student", "read_meta", "train_student",
]

_WHERE = {
    "META_FILE": "s3ray.student.checkpoint",
    "read_meta": "s3ray.student.checkpoint",
    "StudentPredictor": "s3ray.student.predict",
    "TrainResult": "s3ray.student.train",
    "EvalResult": "s3ray.student.train",
    "evaluate_student": "s3ray.student.train",
    "train_student": "s3ray.student.train",
}

if TYPE_CHECKING:  # names resolve lazily below
    from s3ray.student.checkpoint import META_FILE, read_meta
    from s3ray.student.predict import StudentPredictor
    from s3ray.student.train import EvalResult, TrainResult, evaluate_student, train_student


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 's3ray.student' has no attribute {name!r}")
