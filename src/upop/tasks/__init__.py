"""Task registry: one entry per task name, in one visible place."""

from __future__ import annotations

from ..errors import TaskError
from .base import Task
from .retrieval import RetrievalTask

TASKS: dict[str, type[Task]] = {
    "retrieval": RetrievalTask,
}


def get_task(name: str | Task) -> Task:
    """The task called ``name`` (or ``name`` itself if it is already a Task)."""
    if isinstance(name, Task):
        return name
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; available tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]()


__all__ = ["TASKS", "Task", "get_task"]
