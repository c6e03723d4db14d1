"""Shapes-world writers for the vision tasks, in the real on-disk formats.

* :func:`write_classification` - ImageFolder: ``OUT/{train,val,test}/<class>/<split>_<i>.png``.
  The class of an image is the colour and kind of its main object (``"red_circle"``): a *large*
  object drawn first; 0-2 *small* distractors of any colour and kind are added, so neither the
  colours nor the kinds present in the image give the class away. :data:`CLASSIFICATION_CLASSES`
  are 10 (colour, kind) pairs in which every colour and kind appears, most of them twice;
  image ``i`` of a split has class ``i % 10``, so the splits are balanced.
* :func:`write_segmentation` - ADE20K layout: ``OUT/images/{training,validation,testing}/*.png``
  and ``OUT/annotations/{...}/*.png`` (same stem), plus ``OUT/classes.json``. Annotation values
  follow ADE20K: ``0`` is "other/ignore" (the Shapes world has no such pixels: every pixel is
  labelled), ``1`` is the background class and ``2 + k`` is shape kind ``KINDS[k]``. The reader
  maps ``v -> v - 1`` (``0 -> 255`` ignore), so the model's classes are
  :data:`SEGMENTATION_CLASSES` = ``("background", "circle", ...)``: the background is a real
  class, which keeps mIoU meaningful.

Both write every file atomically and finish with ``shapes.json`` (the settings); a second call
with the same settings on a complete folder rewrites nothing (``"reused": True``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from upop.errors import ConfigError
from upop.data.shapes import (
    KINDS,
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    VERSION,
    Scene,
    check_int,
    _place,
    scene_rng,
    atomic_save_png,
    atomic_write_json,
    make_scene,
    render,
    render_with_mask,
)

CLASSIFICATION_CLASSES: tuple[tuple[str, str], ...] = (
    ("red", "circle"), ("red", "square"), ("green", "circle"), ("green", "triangle"), ("blue", "square"),
    ("blue", "star"), ("yellow", "triangle"), ("yellow", "diamond"), ("purple", "star"), ("orange", "cross"),
)
"""(colour, kind) of the main object, one per class; class names are ``"<colour>_<kind>"``."""

SEGMENTATION_CLASSES: tuple[str, ...] = ("background", *KINDS)
"""Model classes of the Shapes segmentation set (annotation value minus one)."""

ADE_SPLITS = {"train": "training", "val": "validation", "test": "testing"}
"""Shapes split -> ADE20K folder name."""


def class_name(colour: str, kind: str) -> str:
    return f"{colour}_{kind}"


def classification_scene(rng, label: int) -> Scene:
    """A scene whose main (large, first) object has class ``CLASSIFICATION_CLASSES[label]``."""
    colour, kind = CLASSIFICATION_CLASSES[label]
    grey = rng.randint(205, 248)
    background = tuple(min(255, max(0, grey + rng.randint(-4, 4))) for _ in range(3))
    main = _place(rng, "large", [])
    main.colour, main.kind = colour, kind
    objects = [main]
    for _ in range(rng.choice((0, 1, 1, 2))):
        extra = _place(rng, "small", objects)
        if extra is not None:
            objects.append(extra)
    return Scene(objects=objects, background=background)  # type: ignore[arg-type]


def _check_counts(where: str, train, val, test, image_size, seed) -> dict[str, int]:
    counts = {"train": check_int(where, "train", train, 1), "val": check_int(where, "val", val, 1),
              "test": check_int(where, "test", test, 1)}
    check_int(where, "image_size", image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
    check_int(where, "seed", seed, -(2 ** 63))
    return counts


def _prepare(out: Path, where: str, settings: dict, expected: list[Path]) -> bool:
    """True if ``out`` already holds exactly this dataset; otherwise make it ready for writing."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{where}: out_dir {out} exists and is not a directory")
    try:
        old = json.loads((out / "shapes.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    if old == settings and all(p.is_file() for p in expected):
        return True
    out.mkdir(parents=True, exist_ok=True)
    (out / "shapes.json").unlink(missing_ok=True)  # an interrupted rewrite must never look complete
    return False


_GENERATED = re.compile(r"^(train|val|test)_(\d{5,})\.png$")


def _remove_stale(folders: list[Path], expected: set[Path]) -> None:
    """Delete generator files (``<split>_<i>.png``) of an earlier run that this run did not write."""
    for folder in folders:
        if folder.is_dir():
            for p in folder.iterdir():
                if _GENERATED.match(p.name) and p not in expected:
                    p.unlink()


def write_classification(out_dir, *, train: int = 2000, val: int = 200, test: int = 200, image_size: int = 64,
                         seed: int = 0) -> dict:
    """Write a Shapes classification dataset in the ImageFolder layout under ``out_dir``.

    Returns ``{"out_dir", "reused", "settings", "classes", "splits": {split: {"images", "folder"}}}``.
    """
    where = "write_classification"
    counts = _check_counts(where, train, val, test, image_size, seed)
    for split, count in counts.items():  # an empty class folder is refused by the reader
        check_int(where, split, count, len(CLASSIFICATION_CLASSES))
    names = [class_name(c, k) for c, k in CLASSIFICATION_CLASSES]
    settings = {"format": "upop-shapes-classification", "version": VERSION, "seed": seed, "image_size": image_size,
                **counts, "classes": sorted(names)}
    out = Path(out_dir)
    files = {split: [out / split / names[i % len(names)] / f"{split}_{i:05d}.png" for i in range(n)]
             for split, n in counts.items()}
    summary = {"out_dir": str(out), "reused": False, "settings": settings, "classes": sorted(names),
               "splits": {s: {"images": n, "folder": str(out / s)} for s, n in counts.items()}}
    expected = [p for paths in files.values() for p in paths]
    if _prepare(out, where, settings, expected):
        return {**summary, "reused": True}
    for split, paths in files.items():
        for name in names:
            (out / split / name).mkdir(parents=True, exist_ok=True)
        for i, path in enumerate(paths):
            scene = classification_scene(scene_rng(seed, f"classification-{split}", i), i % len(names))
            atomic_save_png(render(scene, image_size), path)
    _remove_stale([out / s / n for s in counts for n in names], set(expected))
    atomic_write_json(out / "shapes.json", settings)
    return summary




def annotation_map(scene: Scene, mask: np.ndarray) -> np.ndarray:
    """ADE20K-style annotation (``uint8``): 1 = background, ``2 + k`` = shape kind ``KINDS[k]``."""
    values = np.array([1] + [2 + KINDS.index(o.kind) for o in scene.objects], dtype=np.uint8)
    return values[mask]


def write_segmentation(out_dir, *, train: int = 2000, val: int = 200, test: int = 200, image_size: int = 64,
                       seed: int = 0) -> dict:
    """Write a Shapes semantic segmentation dataset in the ADE20K layout under ``out_dir``.

    Splits go to ``training``, ``validation`` and ``testing``. Returns ``{"out_dir", "reused",
    "settings", "classes", "splits": {split: {"images", "folder"}}}``.
    """
    where = "write_segmentation"
    counts = _check_counts(where, train, val, test, image_size, seed)
    settings = {"format": "upop-shapes-segmentation", "version": VERSION, "seed": seed, "image_size": image_size,
                **counts, "classes": list(SEGMENTATION_CLASSES)}
    out = Path(out_dir)
    pairs = {split: [(out / "images" / ADE_SPLITS[split] / f"{split}_{i:05d}.png",
                      out / "annotations" / ADE_SPLITS[split] / f"{split}_{i:05d}.png") for i in range(n)]
             for split, n in counts.items()}
    summary = {"out_dir": str(out), "reused": False, "settings": settings, "classes": list(SEGMENTATION_CLASSES),
               "splits": {s: {"images": n, "folder": str(out / "images" / ADE_SPLITS[s])} for s, n in counts.items()}}
    expected = [p for ps in pairs.values() for pair in ps for p in pair] + [out / "classes.json"]
    if _prepare(out, where, settings, expected):
        return {**summary, "reused": True}
    for split, ps in pairs.items():
        for kind in ("images", "annotations"):
            (out / kind / ADE_SPLITS[split]).mkdir(parents=True, exist_ok=True)
        for i, (image_path, ann_path) in enumerate(ps):
            scene = make_scene(scene_rng(seed, f"segmentation-{split}", i))
            image, mask = render_with_mask(scene, image_size)
            atomic_save_png(image, image_path)
            atomic_save_png(Image.fromarray(annotation_map(scene, mask), mode="L"), ann_path)
    atomic_write_json(out / "classes.json", list(SEGMENTATION_CLASSES))
    folders = [out / kind / ADE_SPLITS[s] for s in counts for kind in ("images", "annotations")]
    _remove_stale(folders, set(expected))
    atomic_write_json(out / "shapes.json", settings)
    return summary


__all__ = ["ADE_SPLITS", "CLASSIFICATION_CLASSES", "SEGMENTATION_CLASSES", "annotation_map", "classification_scene",
           "write_classification", "write_segmentation"]
