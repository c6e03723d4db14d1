"""Dataset readers for the real formats, and the Shapes world that writes them.

``WRITERS`` maps a task name to the Shapes writer of that task's format (``upop data shapes``);
:func:`write_shapes` runs one so that a kill leaves either nothing of the new data or all of it.
"""

from __future__ import annotations

import os
import shutil
from importlib import import_module
from pathlib import Path
from typing import Callable

from upop.errors import ConfigError, show

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


def shapes_min_split(task: str) -> int:
    """Fewest images (NLVR2: pairs) per split the Shapes writer of ``task`` needs for data its
    reader accepts: classification needs one image per class (the class folders of every split
    must be the same and none may be empty), every other task one."""
    return getattr(shapes_writer(task), "min_split", 1)


def check_shapes_sizes(task: str, train: int, val: int, test: int) -> None:
    """Refuse, in one line and before anything is written, split sizes the writer of ``task``
    cannot fill (see :func:`shapes_min_split`)."""
    least = shapes_min_split(task)
    for split, count in (("train", train), ("val", val), ("test", test)):
        if isinstance(count, int) and not isinstance(count, bool) and count < least:
            why = getattr(shapes_writer(task), "min_split_why", "")
            raise ConfigError(f"--{split} {count} is too few for the Shapes {task} data: need at least {least} "
                              f"images per split{f' ({why})' if why else ''}")


def write_shapes(task: str, out_dir, **settings) -> dict:
    """Write the Shapes data of ``task`` into the folder ``out_dir`` all at once: the writer fills
    a temp folder inside it named in upop's temp scheme (``.shapes.json.tmp-PID-RANDOM``, which
    :meth:`upop.runs.rundir.RunDir.clean_temp` removes after a kill), which is fsynced; then its entries
    are renamed into place, ``shapes.json`` (the completion mark) last. ``out_dir`` must hold none
    of the entries written (the caller set the previous data aside). On an exception nothing
    of the new data is left."""
    from upop.runs.atomic import fsync_dir, fsync_tree, make_temp_dir

    check_shapes_sizes(task, settings.get("train", 1), settings.get("val", 1), settings.get("test", 1))
    writer = shapes_writer(task)
    out = Path(out_dir)
    stage = make_temp_dir(out / "shapes.json")
    moved: list[Path] = []
    try:
        info = writer(stage, **settings)
        fsync_tree(stage)
        for name in sorted(os.listdir(stage), key=lambda n: (n == "shapes.json", n)):
            if os.path.lexists(out / name):
                raise ConfigError(f"output folder {show(out)} already holds {show(name)}; refusing to replace it")
            os.rename(stage / name, out / name)
            moved.append(out / name)
        stage.rmdir()
    except BaseException:
        for path in moved:  # ours, written by this call: back to nothing of the new data
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        shutil.rmtree(stage, ignore_errors=True)
        raise
    fsync_dir(out)
    return {**info, "out_dir": str(out)}
