"""The teacher side: engines (vLLM, transformers, OpenAI HTTP), the Ray replica pool, its cache, serving."""

from s3ray.teacher.types import GenerationRequest, GenerationResult, Sampling, derive_seed

__all__ = ["GenerationRequest", "GenerationResult", "Sampling", "TeacherPool", "derive_seed", "make_engine"]


def __getattr__(name: str):
    # Lazy: importing s3ray.teacher must not import Ray or vLLM.
    if name == "TeacherPool":
        from s3ray.teacher.pool import TeacherPool

        return TeacherPool
    if name == "make_engine":
        from s3ray.teacher.engines import make_engine

        return make_engine
    raise AttributeError(name)
