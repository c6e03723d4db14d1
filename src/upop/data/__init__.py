"""Dataset readers for the real formats, and the Shapes world that writes them.

Each task's registration (:mod:`upop.tasks.registry`) names the Shapes writer of that task's format
(``upop data shapes``) and the fewest images per split it needs; :func:`write_shapes` runs one so
that a kill leaves either nothing of the new data or all of it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from upop.errors import ConfigError, show
from upop.tasks.registry import task_entry


def shapes_writer(task: str) -> Callable:
    """The Shapes writer of ``task``'s registration: ``writer(out_dir, *, train, val, test, image_size,
    seed) -> dict``; TaskError for a name that is no task."""
    return task_entry(task).writer


def shapes_min_split(task: str) -> int:
    """Fewest images (NLVR2: pairs) per split the Shapes writer of ``task`` needs for data its
    reader accepts, as the task registers it (classification: one image per class, as the class
    folders of every split must be the same and none may be empty; every other task one)."""
    return task_entry(task).min_split


def check_shapes_sizes(task: str, train: int, val: int, test: int) -> None:
    """Refuse, in one line and before anything is written, split sizes the writer of ``task``
    cannot fill (see :func:`shapes_min_split`)."""
    entry = task_entry(task)
    for split, count in (("train", train), ("val", val), ("test", test)):
        if isinstance(count, int) and not isinstance(count, bool) and count < entry.min_split:
            why = f" ({entry.min_split_why})" if entry.min_split_why else ""
            raise ConfigError(f"--{split} {count} is too few for the Shapes {task} data: need at least "
                              f"{entry.min_split} images per split{why}")


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
