"""The student: training (Ray Train: DDP or DeepSpeed ZeRO; or a fast frozen-embedding head), evaluation,
and a predictor for Ray Data error mining. The checkpoint format is described in checkpoint.py."""

from s3ray.student.checkpoint import META_FILE, read_meta
from s3ray.student.predict import StudentPredictor
from s3ray.student.train import StudentResult, evaluate_student, train_student

__all__ = ["META_FILE", "StudentPredictor", "StudentResult", "evaluate_student", "read_meta", "train_student"]
