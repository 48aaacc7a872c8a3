"""Task families. `make_task(cfg)` turns the run config into the task object the loop uses."""

from __future__ import annotations

from s3ray.tasks.base import ParseError, Task
from s3ray.tasks.classification import ClassificationTask

__all__ = ["ParseError", "Task", "make_task"]


def make_task(task_cfg, labels: list[str] | None, synthesis_cfg=None) -> Task:
    """Build the task for `task_cfg.type` with resolved label names."""
    kw = {
        "labels": labels,
        "description": task_cfg.description,
        "label_descriptions": dict(task_cfg.label_descriptions),
    }
    if synthesis_cfg is not None:
        kw.update(min_chars=synthesis_cfg.min_chars, max_chars=synthesis_cfg.max_chars)
    if task_cfg.type == "classification":
        return ClassificationTask(**kw)
    if task_cfg.type == "pair":
        from s3ray.tasks.pair import PairTask

        return PairTask(**kw)
    if task_cfg.type == "extractive_qa":
        from s3ray.tasks.qa import ExtractiveQATask

        kw["labels"] = None
        return ExtractiveQATask(**kw, answers=task_cfg.qa_answers)
    raise ValueError(f"task.type {task_cfg.type!r}: expected classification | pair | extractive_qa")
