"""ADE20K-style semantic segmentation data (the layout mmseg and the UPop Segmenter code read).

    DIR/images/{training,validation[,testing]}/<stem>.jpg|jpeg|png
    DIR/annotations/{training,validation[,testing]}/<stem>.png     (single channel, same size)
    DIR/classes.json                                               (optional: list of class names)

Annotation values follow ADE20K SceneParsing: ``0`` is "other" and is ignored, ``1..N`` are the
classes. As with mmseg's ``reduce_zero_label`` they are mapped ``v -> v - 1`` and ``0 -> 255``
(:data:`IGNORE_INDEX`). ``N`` is the length of ``classes.json``, or 150 (ADE20K) without it.

Split names: ``train`` -> ``training``, ``val`` -> ``validation``, ``test`` -> ``testing`` if
``annotations/testing`` exists, else ``validation`` (ADE20K ships no test annotations); a folder
name (``training``) can be given directly. Errors are one-line :class:`~upop.errors.DataError`\\ s
naming the file: an image without annotation (when the split is read); an unreadable image or
annotation, a size mismatch, or a label value outside ``[0, N]`` (when the sample is read).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from .retrieval import load_rgb_image

IGNORE_INDEX = 255
ADE20K_CLASSES = 150
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SPLIT_FOLDERS = {"train": "training", "val": "validation", "test": "testing"}


def split_folder(data_dir, split: str) -> str:
    """The ADE20K folder name that holds ``split`` (see the module docstring)."""
    if not isinstance(split, str) or not split or "/" in split or "\\" in split:
        raise ConfigError(f"split={split!r} is not allowed (need 'train', 'val', 'test' or a folder name)")
    folder = SPLIT_FOLDERS.get(split, split)
    if split == "test" and not (Path(data_dir) / "annotations" / "testing").is_dir():
        folder = "validation"
    return folder


def read_classes(data_dir) -> list[str] | None:
    """Class names from ``DIR/classes.json`` (a JSON list of strings), or None if there is none."""
    path = Path(data_dir) / "classes.json"
    if not path.is_file():
        return None
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"class list {path} cannot be read ({' '.join(str(exc).split())})") from None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names) or len(names) > 254:
        raise DataError(f"class list {path} must be a JSON list of 1 to 254 class names")
    return names


def load_ade20k_split(data_dir, split: str) -> list[tuple[Path, Path]]:
    """``(image, annotation)`` pairs of one split, sorted by file name."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data_dir {root} is not a directory (need DIR/images/<split> and DIR/annotations/<split>)")
    folder = split_folder(root, split)
    images, annotations = root / "images" / folder, root / "annotations" / folder
    for d in (images, annotations):
        if not d.is_dir():
            raise DataError(f"folder {d} does not exist (ADE20K layout: {root}/images/{folder}/*.jpg and "
                            f"{root}/annotations/{folder}/*.png; split {split!r})")
    files = sorted(p for p in images.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    if not files:
        raise DataError(f"image folder {images} has no images (need *.jpg or *.png files)")
    pairs = []
    for image in files:
        ann = annotations / (image.stem + ".png")
        if not ann.is_file():
            raise DataError(f"image {image} has no annotation (expected {ann})")
        pairs.append((image, ann))
    return pairs


def load_annotation(path, num_classes: int) -> np.ndarray:
    """Raw annotation values (``uint8`` array), checked to lie in ``[0, num_classes]``."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("L", "P", "I", "I;16"):
                raise DataError(f"annotation {path} has mode {img.mode} (need a single-channel PNG of class ids)")
            arr = np.asarray(img).astype(np.int64)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"annotation {path} cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    bad = (arr < 0) | (arr > num_classes)
    if bad.any():
        value = int(arr[bad][0])
        raise DataError(f"annotation {path} has label value {value} outside [0, {num_classes}] "
                        f"(0 = ignore, 1..{num_classes} = classes)")
    return arr.astype(np.uint8)


class ADE20KDataset(Dataset):
    """``ds[i] == {"image": PIL RGB, "label": PIL "L" image of class ids (255 = ignore), "index": i}``."""

    def __init__(self, pairs: Sequence[tuple[Path, Path]], num_classes: int, classes: list[str] | None = None):
        self.pairs, self.num_classes = list(pairs), int(num_classes)
        self.classes = classes or [f"class_{i}" for i in range(self.num_classes)]
        if not self.pairs:
            raise DataError("segmentation dataset has no images")

    @classmethod
    def from_split(cls, data_dir, split: str) -> "ADE20KDataset":
        classes = read_classes(data_dir)
        return cls(load_ade20k_split(data_dir, split), len(classes) if classes else ADE20K_CLASSES, classes)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        image_path, ann_path = self.pairs[i]
        image = load_rgb_image(image_path)
        raw = load_annotation(ann_path, self.num_classes)
        if raw.shape != (image.height, image.width):
            raise DataError(f"annotation {ann_path} is {raw.shape[1]}x{raw.shape[0]} but its image {image_path} is "
                            f"{image.width}x{image.height} (need the same size)")
        label = np.where(raw == 0, IGNORE_INDEX, raw.astype(np.int64) - 1).astype(np.uint8)
        return {"image": image, "label": Image.fromarray(label, mode="L"), "index": int(i)}


class SegmentationCollator:
    """Samples -> ``{"pixel_values", "labels" (B, H, W) long, "index"}``.

    Images go through the model's image processor (which must resize without cropping); label maps
    are resized to the same ``H x W`` with nearest-neighbour sampling.
    """

    def __init__(self, processor):
        self.image_processor = getattr(processor, "image_processor", processor)
        if not callable(self.image_processor):
            raise ConfigError(f"segmentation needs an image processor, got {type(processor).__name__}")

    def __call__(self, batch: Sequence[dict]) -> dict[str, torch.Tensor]:
        pixels = self.image_processor(images=[s["image"] for s in batch], return_tensors="pt")["pixel_values"]
        h, w = pixels.shape[-2:]
        labels = [np.asarray(s["label"].resize((w, h), Image.Resampling.NEAREST), dtype=np.int64) for s in batch]
        return {"pixel_values": pixels, "labels": torch.from_numpy(np.stack(labels)),
                "index": torch.tensor([s["index"] for s in batch], dtype=torch.long)}


__all__ = ["ADE20KDataset", "ADE20K_CLASSES", "IGNORE_INDEX", "SegmentationCollator", "load_ade20k_split",
           "load_annotation", "read_classes", "split_folder"]
