"""The teacher side: `make_teacher` -> `Teacher` (cache, order, retries, stats) over a backend (local engine,
Ray replicas, HTTP endpoint); engines in `engines/`; `s3ray serve` in serve.py."""

from s3ray.teacher.teacher import Teacher, TeacherStats, make_teacher, teacher_model_path
from s3ray.teacher.types import GenerationRequest, GenerationResult, Sampling, TeacherError, derive_seed

__all__ = ["GenerationRequest", "GenerationResult", "Sampling", "Teacher", "TeacherError", "TeacherStats",
           "derive_seed", "make_teacher", "teacher_model_path"]
