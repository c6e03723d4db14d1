"""``upop data check``: every problem of a data set, found in one pass, before a run starts.

:func:`check_data` reads the ``train``, ``val`` and ``test`` splits of a task's format with the
same readers a run uses, but records each bad entry instead of stopping at the first, and then
checks every referenced file once:

* ``images="header"`` (fast, the default; ``compress`` runs it before training): each image is
  opened and its header checked (supported mode, size limit, Pillow's verification: PNG chunk
  checksums and completeness) without decoding pixels;
* ``images="full"``: each image is decoded through :func:`upop.data.images.load_rgb_image`, as
  training will (this also finds damaged JPEG data).

Segmentation annotation maps are always decoded (their values are the labels): mode, size equal
to the image's, values in ``[0, N]``. Every problem is one line naming the file and what is
wrong; a fault that appears later (a file changed on disk) still raises a DataError naming the
file when the sample is read.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from upop.errors import ConfigError, DataError, show
from upop.data.ade20k import ADE20K_CLASSES, check_annotation_values, load_ade20k_split, read_classes
from upop.data.images import load_label_map, load_rgb_image, probe_image
from upop.data.imagefolder import class_difference, load_imagefolder_split
from upop.data.nlvr import load_nlvr_split
from upop.data.retrieval import load_retrieval_split
from upop.data.vqa import load_vqa_split
from upop.tasks.registry import task_entry

SPLITS = ("train", "val", "test")
IMAGE_CHECKS = ("header", "full")


@dataclass
class DataReport:
    """What :func:`check_data` found: a summary per split and every problem, one line each."""

    task: str
    data_dir: Path
    images: str
    splits: dict[str, dict[str, int]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> list[str]:
        """One line per split read: ``train: 8 items, 8 images, 40 captions``."""
        return [f"{split}: " + ", ".join(f"{n} {what}" for what, n in counts.items())
                for split, counts in self.splits.items()]

    def raise_for_problems(self) -> None:
        """Raise one DataError line (the count and the first problem) if there is any problem."""
        if self.problems:
            raise DataError(f"{len(self.problems)} problem{'s' if len(self.problems) > 1 else ''} in "
                            f"{show(self.data_dir)}, the first: {self.problems[0]} (list them all with: upop data "
                            f"check --task {self.task} --data DIR)")


class _Files:
    """Checks each image file once (header or full decode) and records its problems."""

    def __init__(self, mode: str, problems: list[str]):
        self.mode, self.problems = mode, problems
        self.sizes: dict[Path, tuple[int, int] | None] = {}

    def image(self, path: Path) -> tuple[int, int] | None:
        """``(width, height)`` of a usable image, None (problem recorded) otherwise."""
        if path not in self.sizes:
            try:
                self.sizes[path] = probe_image(path) if self.mode == "header" else load_rgb_image(path).size
            except DataError as exc:
                self.problems.append(str(exc))
                self.sizes[path] = None
        return self.sizes[path]

    def images(self, paths) -> int:
        """Check ``paths``; the number of distinct files."""
        unique = list(dict.fromkeys(paths))
        for path in unique:
            self.image(path)
        return len(unique)


def check_retrieval(root: Path, split: str, files: _Files, problems: list[str]) -> dict[str, int]:
    """One split of the Karpathy JSON layout (retrieval, captioning)."""
    items = load_retrieval_split(root, split, problems=problems)
    return {"items": len(items), "images": files.images(it.image for it in items),
            "captions": sum(len(it.captions) for it in items)}


def check_vqa(root: Path, split: str, files: _Files, problems: list[str]) -> dict[str, int]:
    """One split of VQAv2 questions and answers."""
    items = load_vqa_split(root, split, problems=problems)
    return {"items": len(items), "images": files.images(it.image for it in items),
            "answers": len({a for it in items for a in it.answers})}


def check_nlvr(root: Path, split: str, files: _Files, problems: list[str]) -> dict[str, int]:
    """One split of NLVR2 pairs."""
    items = load_nlvr_split(root, split, problems=problems)
    labels = Counter(it.label for it in items)
    return {"items": len(items), "images": files.images(p for it in items for p in it.images),
            "true": labels[1], "false": labels[0]}


def check_classification(root: Path, split: str, files: _Files, problems: list[str],
                         seen: dict[str, list[str]]) -> dict[str, int]:
    """One ImageFolder split; its class folders must be those of the first split checked (``seen``:
    split -> class names, from :func:`classification_context`)."""
    items, classes = load_imagefolder_split(root, split, problems=problems)
    if seen:
        first_split, first = next(iter(seen.items()))
        difference = class_difference(root / split, classes, first_split, first)
        if difference:
            problems.append(difference)
    seen.setdefault(split, classes)
    return {"items": len(items), "images": files.images(path for path, _ in items), "classes": len(classes)}


def check_segmentation(root: Path, split: str, files: _Files, problems: list[str],
                       num_classes: int | None) -> dict[str, int]:
    """One ADE20K-layout split: images, and annotation maps of the same size with values in
    ``[0, num_classes]`` (``num_classes`` from :func:`segmentation_context`; None: not range-checked)."""
    pairs = load_ade20k_split(root, split, problems=problems)
    for image, annotation in pairs:
        size = files.image(image)
        try:
            values = load_label_map(annotation, "annotation")
            if num_classes is not None:
                check_annotation_values(annotation, values, num_classes)
        except DataError as exc:
            problems.append(str(exc))
            continue
        if size is not None and (values.shape[1], values.shape[0]) != size:
            problems.append(f"annotation {show(annotation)} is {values.shape[1]}x{values.shape[0]} but its image "
                            f"{show(image)} is {size[0]}x{size[1]} (need the same size)")
    return {"items": len(pairs), "images": len(pairs), **({"classes": num_classes} if num_classes else {})}


def classification_context(root: Path, problems: list[str]) -> dict:
    """:func:`check_classification`'s state across the splits: the class names of each split seen."""
    return {"seen": {}}


def segmentation_context(root: Path, problems: list[str]) -> dict:
    """:func:`check_segmentation`'s class count, read once from the data's class list (ADE20K's 150
    without one; None, with the problem recorded, when the list is unreadable)."""
    try:
        named = read_classes(root)
    except DataError as exc:  # label values cannot be range-checked without a class count
        problems.append(str(exc))
        return {"num_classes": None}
    return {"num_classes": len(named[0]) if named else ADE20K_CLASSES}


def check_data(task: str, data_dir, images: str = "header") -> DataReport:
    """Check the ``train``/``val``/``test`` splits of ``data_dir`` in ``task``'s format, in one pass.

    Returns a :class:`DataReport`; a problem with a split, an entry or a file is a line of
    ``report.problems`` (never an exception). The task's registration (:mod:`upop.tasks.registry`)
    names its checker of one split. Raises TaskError for an unknown task, ConfigError for an
    ``images`` value and DataError when ``data_dir`` is not a folder.
    """
    entry = task_entry(task)
    if images not in IMAGE_CHECKS:
        raise ConfigError(f"images={show(images)} is not allowed (need 'header' or 'full')")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data folder {show(root)} is not a directory (need a folder in the {task} format, see "
                        "docs/data.md)")
    report = DataReport(task=task, data_dir=root, images=images)
    files = _Files(images, report.problems)
    context = entry.check_context(root, report.problems) if entry.check_context is not None else {}
    for split in SPLITS:
        try:
            report.splits[split] = entry.checker(root, split, files, report.problems, **context)
        except DataError as exc:
            report.problems.append(str(exc))
    return report


__all__ = ["DataReport", "IMAGE_CHECKS", "check_classification", "check_data", "check_nlvr", "check_retrieval",
           "check_segmentation", "check_vqa", "classification_context", "segmentation_context"]
