"""Task registry: task name -> ``"module:Class"``, in one visible place, imported on first use."""

from __future__ import annotations

from importlib import import_module

from typing import TYPE_CHECKING

from upop.errors import TaskError

if TYPE_CHECKING:
    from upop.tasks.base import Task

TASKS: dict[str, str] = {
    "retrieval": "upop.tasks.retrieval:RetrievalTask",
    "vqa": "upop.tasks.vqa:VQATask",
    "caption": "upop.tasks.caption:CaptionTask",
    "nlvr": "upop.tasks.nlvr:NLVRTask",
    "classification": "upop.tasks.classification:ClassificationTask",
    "segmentation": "upop.tasks.segmentation:SegmentationTask",
    "distill": "upop.tasks.distill:DistillTask",
}


def get_task(name: str | Task) -> Task:
    """The task called ``name`` (or ``name`` itself if it is already a Task)."""
    from upop.tasks.base import Task

    if isinstance(name, Task):
        return name
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; available tasks: {', '.join(sorted(TASKS))}")
    module, cls = TASKS[name].split(":")
    return getattr(import_module(module), cls)()


def __getattr__(name: str):
    if name == "Task":  # imported on first use: the CLI's parser reads TASKS without torch
        from upop.tasks.base import Task

        return Task
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["TASKS", "Task", "get_task"]
