"""Dataset readers for the real formats, and the Shapes world that writes them.

``WRITERS`` maps a task name to the Shapes writer of that task's format (``upop data shapes``).
"""

from __future__ import annotations

from importlib import import_module
from typing import Callable

from ..errors import ConfigError

WRITERS: dict[str, str] = {
    "retrieval": "upop.data.shapes:write_retrieval",
    "vqa": "upop.data.shapes_vl:write_vqa",
    "nlvr": "upop.data.shapes_vl:write_nlvr",
    "caption": "upop.data.shapes_vl:write_caption",
    "classification": "upop.data.shapes_vision:write_classification",
    "segmentation": "upop.data.shapes_vision:write_segmentation",
    "distill": "upop.data.unlabelled:write_unlabelled",
}


def shapes_writer(task: str) -> Callable:
    """The Shapes writer for ``task``: ``writer(out_dir, *, train, val, test, image_size, seed) -> dict``."""
    if task not in WRITERS:
        raise ConfigError(f"the Shapes world has no writer for task {task!r}; available: {', '.join(sorted(WRITERS))}")
    module, fn = WRITERS[task].split(":")
    return getattr(import_module(module), fn)
