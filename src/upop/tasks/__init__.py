"""Tasks: one module per task, each ending with its one :func:`~upop.tasks.registry.register_task`
call (its class, Shapes writer, data checker, minimum split size and ``--help`` summary). The
registry (:mod:`.registry`) finds them without importing them; a task's module is imported on
first use of its name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from upop.tasks.registry import TaskEntry, register_task, task_entries, task_entry, task_names

if TYPE_CHECKING:
    from upop.tasks.base import Task


def get_task(name: str | Task) -> Task:
    """A new instance of the task called ``name`` (or ``name`` itself if it is already a Task);
    TaskError for a name that is no task."""
    from upop.tasks.base import Task

    if isinstance(name, Task):
        return name
    return task_entry(name).task()


def __getattr__(name: str):
    if name == "Task":  # imported on first use: the CLI's parser reads the task names without torch
        from upop.tasks.base import Task

        return Task
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Task", "TaskEntry", "get_task", "register_task", "task_entries", "task_entry",
           "task_names"]
