"""Task families. `make_task(cfg)` turns the run config into the task object the loop uses.

A family is one `Task` subclass (see base.py for what it decides); `register_task(name, cls)` makes it known
to `make_task`, to checkpoints (which store the family's name) and to the report."""

from __future__ import annotations

from s3ray.tasks.base import ParseError, Task
from s3ray.tasks.classification import ClassificationTask
from s3ray.tasks.pair import PairTask
from s3ray.tasks.qa import ExtractiveQATask

__all__ = ["ParseError", "Task", "make_task", "register_task", "task_class"]

_FAMILIES: dict[str, type[Task]] = {}


def register_task(name: str, cls: type[Task]) -> None:
    """Make a task family known by `name` (its `type`). Re-registering the same class is a no-op."""
    if _FAMILIES.get(name, cls) is not cls:
        raise ValueError(f"task family {name!r} is already registered as {_FAMILIES[name].__name__}")
    _FAMILIES[name] = cls


for _cls in (ClassificationTask, PairTask, ExtractiveQATask):
    register_task(_cls.type, _cls)


def task_class(name: str) -> type[Task]:
    if name not in _FAMILIES:
        raise ValueError(f"task.type {name!r}: expected one of {' | '.join(_FAMILIES)}")
    return _FAMILIES[name]


def make_task(task_cfg, labels: list[str] | None, synthesis_cfg=None) -> Task:
    """Build the task for `task_cfg.type` with resolved label names."""
    kw = {"description": task_cfg.description, "label_descriptions": dict(task_cfg.label_descriptions)}
    if synthesis_cfg is not None:
        kw.update(min_chars=synthesis_cfg.min_chars, max_chars=synthesis_cfg.max_chars)
    return task_class(task_cfg.type).from_config(task_cfg, labels, **kw)


def task_for_checkpoint(task_type: str, labels: list[str] | None) -> Task:
    """The task a student checkpoint was trained for (its inputs and head), from its stored name and labels."""
    return task_class(task_type)(labels=labels)
