"""ADE20K-style semantic segmentation data (the layout mmseg and the UPop Segmenter code read).

    DIR/images/{training,validation[,testing]}/<stem>.jpg|jpeg|png
    DIR/annotations/{training,validation[,testing]}/<stem>.png     (single channel, same size)
    DIR/classes.json                                               (optional: list of class names)
    DIR/objectInfo150.txt or .csv                                  (optional: ADE20K's class table)

Annotation values follow ADE20K SceneParsing: ``0`` is "other" and is ignored, ``1..N`` are the
classes. As with mmseg's ``reduce_zero_label`` they are mapped ``v -> v - 1`` and ``0 -> 255``
(:data:`IGNORE_INDEX`). ``N`` is the number of class names (``classes.json``, else the rows of
``objectInfo150``, first synonym of each ``Name``), or 150 (ADE20K) without either. When the
data names its classes, the segmentation task maps them to the model's ``id2label`` ids
(:mod:`upop.data.labels`) through :meth:`ADE20KDataset.set_label_ids`.

Annotation maps are read as stored integers (:func:`upop.data.images.load_label_map`: ``L``,
``P`` palette indices, ``I;16``; RGB maps are refused). Split names: ``train`` -> ``training``,
``val`` -> ``validation``, ``test`` -> ``testing`` if ``annotations/testing`` exists, else
``validation`` (ADE20K ships no test annotations); a folder name (``training``) can be given
directly. Errors are one-line :class:`~upop.errors.DataError`\\ s naming the file: an image
without annotation (when the split is read); an unreadable image or annotation, a size
mismatch, or a label value outside ``[0, N]`` (when the sample is read).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from upop.errors import ConfigError, DataError, show
from upop.data._files import image_files, not_a_file
from upop.data._problems import report
from upop.data.augment import check_augment, input_size
from upop.data.images import load_label_map, load_rgb_image
from upop.data.seg_augment import segmentation_train_sample

IGNORE_INDEX = 255
ADE20K_CLASSES = 150
MAX_CLASSES = 254
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SPLIT_FOLDERS = {"train": "training", "val": "validation", "test": "testing"}
CLASS_FILES = ("classes.json", "objectInfo150.txt", "objectInfo150.csv")
"""Files naming the classes, first found wins."""


def split_folder(data_dir, split: str) -> str:
    """The ADE20K folder name that holds ``split`` (see the module docstring)."""
    if not isinstance(split, str) or not split or "/" in split or "\\" in split:
        raise ConfigError(f"split={show(split)} is not allowed (need 'train', 'val', 'test' or a folder name)")
    folder = SPLIT_FOLDERS.get(split, split)
    if split == "test" and not (Path(data_dir) / "annotations" / "testing").is_dir():
        folder = "validation"
    return folder


def _json_names(path: Path, text: str) -> list:
    try:
        names = json.loads(text)
    except ValueError as exc:
        raise DataError(f"class list {show(path)} is not valid JSON ({show(str(exc))})") from None
    if not isinstance(names, list):
        raise DataError(f"class list {show(path)} must be a JSON list of class names")
    return names


def _object_info_names(path: Path, text: str) -> list[str]:
    """First synonym of the ``Name`` column of ADE20K's ``objectInfo150`` table, rows in ``Idx`` order."""
    lines = [line for line in text.splitlines() if line.strip()]
    rows = list(csv.reader(lines, delimiter="\t" if lines and "\t" in lines[0] else ","))
    if len(rows) < 2:
        raise DataError(f"class table {show(path)} has no rows (need a header 'Idx Ratio Train Val Name' and one "
                        "row per class)")
    header = [h.strip().lower() for h in rows[0]]
    name_col = header.index("name") if "name" in header else len(header) - 1
    names = []
    for n, row in enumerate(rows[1:], start=1):
        if len(row) <= name_col:
            raise DataError(f"class table {show(path)}: row {n} has no {show(rows[0][name_col])} column")
        if "idx" in header and row[header.index("idx")].strip() != str(n):
            raise DataError(f"class table {show(path)}: row {n} has Idx {show(row[header.index('idx')])} (need rows "
                            "in order 1, 2, ...)")
        names.append(row[name_col].split(";")[0].split(",")[0].strip())
    return names


def read_classes(data_dir) -> tuple[list[str], Path] | None:
    """``(class names, the file they come from)`` (see :data:`CLASS_FILES`), or None if there is none."""
    path = next((Path(data_dir) / n for n in CLASS_FILES if (Path(data_dir) / n).is_file()), None)
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"class list {show(path)} cannot be read ({show(str(exc))})") from None
    names = _json_names(path, text) if path.suffix == ".json" else _object_info_names(path, text)
    if not names or len(names) > MAX_CLASSES or not all(isinstance(n, str) and n.strip() for n in names):
        raise DataError(f"class list {show(path)} must name 1 to {MAX_CLASSES} classes with non-empty strings "
                        f"(got {len(names)} entries)")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"class list {show(path)} names {show(duplicates[0])} more than once (need distinct names)")
    return names, path


def load_ade20k_split(data_dir, split: str, problems: list[str] | None = None) -> list[tuple[Path, Path]]:
    """``(image, annotation)`` pairs of one split, sorted by file name.

    An image without annotation is an error (recorded in ``problems`` and left out when it is a list).
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data_dir {show(root)} is not a directory (need DIR/images/<split> and "
                        "DIR/annotations/<split>)")
    folder = split_folder(root, split)
    images, annotations = root / "images" / folder, root / "annotations" / folder
    for d in (images, annotations):
        if not d.is_dir():
            raise DataError(f"folder {show(d)} does not exist (ADE20K layout: {show(root)}/images/{folder}/*.jpg "
                            f"and {show(root)}/annotations/{folder}/*.png; split {show(split)})")
    files = image_files(images.iterdir(), IMAGE_EXTENSIONS, problems)
    if not files:
        raise DataError(f"image folder {show(images)} has no images (need *.jpg or *.png files)")
    pairs = []
    for image in files:
        ann = annotations / (image.stem + ".png")
        problem = not_a_file(ann)
        if problem is None:
            pairs.append((image, ann))
        elif problem == "does not exist":
            report(problems, f"image {show(image)} has no annotation (expected {show(ann)})")
        else:
            report(problems, f"annotation {show(ann)} of image {show(image)} {problem} (need a PNG file)")
    return pairs


def check_annotation_values(path, values: np.ndarray, num_classes: int) -> None:
    """Raise a DataError if an annotation value lies outside ``[0, num_classes]``."""
    bad = (values < 0) | (values > num_classes)
    if bad.any():
        raise DataError(f"annotation {show(path)} has label value {int(values[bad][0])} outside [0, {num_classes}] "
                        f"(0 = ignore, 1..{num_classes} = classes)")


def load_annotation(path, num_classes: int) -> np.ndarray:
    """Raw annotation values (``uint8`` array), checked to lie in ``[0, num_classes]``."""
    values = load_label_map(path, "annotation")
    check_annotation_values(path, values, num_classes)
    return values.astype(np.uint8)


class ADE20KDataset(Dataset):
    """``ds[i] == {"image": PIL RGB, "label": PIL "L" image of class ids (255 = ignore), "index": i}``.

    ``classes`` are the class names (``class_<k>`` when the data names none: then
    ``class_file`` is None); the label of annotation value ``v >= 1`` is ``label_ids[v - 1]``.
    """

    def __init__(self, pairs: Sequence[tuple[Path, Path]], num_classes: int, classes: list[str] | None = None,
                 class_file: Path | None = None):
        self.pairs, self.num_classes = list(pairs), int(num_classes)
        self.classes = classes or [f"class_{i}" for i in range(self.num_classes)]
        self.class_file = class_file if classes else None
        self.set_label_ids(range(self.num_classes))
        if not self.pairs:
            raise DataError("segmentation dataset has no images")

    @classmethod
    def from_split(cls, data_dir, split: str) -> "ADE20KDataset":
        named = read_classes(data_dir)
        if named is None:
            return cls(load_ade20k_split(data_dir, split), ADE20K_CLASSES)
        classes, path = named
        return cls(load_ade20k_split(data_dir, split), len(classes), classes, path)

    def set_label_ids(self, label_ids: Sequence[int]) -> None:
        """Label class ``k`` (annotation value ``k + 1``) with ``label_ids[k]`` (the model's id of the class)."""
        label_ids = [int(x) for x in label_ids]
        if len(label_ids) != self.num_classes:
            raise ValueError(f"need one label id per class ({self.num_classes}), got {len(label_ids)}")
        lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        lut[1:self.num_classes + 1] = label_ids
        self.label_ids, self._lut = label_ids, lut

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        image_path, ann_path = self.pairs[i]
        image = load_rgb_image(image_path)
        raw = load_annotation(ann_path, self.num_classes)
        if raw.shape != (image.height, image.width):
            raise DataError(f"annotation {show(ann_path)} is {raw.shape[1]}x{raw.shape[0]} but its image "
                            f"{show(image_path)} is {image.width}x{image.height} (need the same size)")
        return {"image": image, "label": Image.fromarray(self._lut[raw], mode="L"), "index": int(i)}


class SegmentationCollator:
    """Samples -> ``{"pixel_values", "labels" (B, H, W) long, "index"}``.

    ``augment="none"``: images go through the model's image processor (which must resize without
    cropping) and label maps are resized to the same ``H x W`` with nearest-neighbour sampling.
    ``augment="deit"`` (the papers' recipe; for segmentation mmseg's ADE20K pipeline, see
    :mod:`upop.data.seg_augment`): random resize, ``S x S`` crop, flip and photometric
    distortion, drawn from ``(seed, epoch, sample index)``; ``S`` is the processor's input size.
    """

    def __init__(self, processor, augment: str = "none", seed: int = 0):
        self.image_processor = getattr(processor, "image_processor", processor)
        if not callable(self.image_processor):
            raise ConfigError(f"segmentation needs an image processor, got {type(processor).__name__}")
        self.augment, self.seed, self.epoch = check_augment(augment), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the augmentation's seed."""
        self.epoch = int(epoch)

    def __call__(self, batch: Sequence[dict]) -> dict[str, torch.Tensor]:
        index = torch.tensor([s["index"] for s in batch], dtype=torch.long)
        if self.augment != "none":
            size = min(input_size(self.image_processor))
            pixels, labels = zip(*(segmentation_train_sample(s["image"], s["label"], self.image_processor, size,
                                                             self.seed, self.epoch, s["index"]) for s in batch))
            return {"pixel_values": torch.stack(pixels), "labels": torch.stack(labels), "index": index}
        pixels = self.image_processor(images=[s["image"] for s in batch], return_tensors="pt")["pixel_values"]
        h, w = pixels.shape[-2:]
        labels = [np.asarray(s["label"].resize((w, h), Image.Resampling.NEAREST), dtype=np.int64) for s in batch]
        return {"pixel_values": pixels, "labels": torch.from_numpy(np.stack(labels)), "index": index}


__all__ = ["ADE20KDataset", "ADE20K_CLASSES", "CLASS_FILES", "IGNORE_INDEX", "SegmentationCollator",
           "check_annotation_values", "load_ade20k_split", "load_annotation", "read_classes", "split_folder"]
