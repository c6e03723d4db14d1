"""Task registry: task name -> ``"module:Class"``, in one visible place, imported on first use."""

from __future__ import annotations

from importlib import import_module

from ..errors import TaskError
from .base import Task

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
    if isinstance(name, Task):
        return name
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; available tasks: {', '.join(sorted(TASKS))}")
    module, cls = TASKS[name].split(":")
    return getattr(import_module(module), cls)()


__all__ = ["TASKS", "Task", "get_task"]
