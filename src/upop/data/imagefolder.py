"""ImageFolder classification data: ``DIR/{train,val,test}/<class_name>/*.png|jpg|jpeg``.

Each sub-folder of a split is a class; classes are sorted by name and numbered from 0, and every
split must have the same classes. Only the files directly inside a class folder with an image
extension (``.png``, ``.jpg``, ``.jpeg``, any case) are read; other files are ignored. Images are
opened (and checked) when a sample is read. Every mistake is a one-line
:class:`~upop.errors.DataError` naming the file or folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from .retrieval import load_rgb_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def _split_dir(data_dir, split: str) -> Path:
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data_dir {root} is not a directory (need DIR/{{train,val,test}}/<class>/*.png|jpg)")
    if not isinstance(split, str) or not split or "/" in split or "\\" in split:
        raise ConfigError(f"split={split!r} is not allowed (need a name such as 'train', 'val' or 'test')")
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"split folder {folder} does not exist (ImageFolder layout: {root}/{split}/<class_name>/*.png)")
    return folder


def load_imagefolder_split(data_dir, split: str) -> tuple[list[tuple[Path, int]], list[str]]:
    """``(items, classes)`` of one split: items are ``(image path, class index)`` sorted by class, file."""
    folder = _split_dir(data_dir, split)
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"split folder {folder} has no class sub-folders (need {folder}/<class_name>/*.png)")
    items = []
    for index, name in enumerate(classes):
        files = sorted(p for p in (folder / name).iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
        if not files:
            raise DataError(f"class folder {folder / name} has no images (need *.png, *.jpg or *.jpeg files)")
        items.extend((p, index) for p in files)
    return items, classes


class ImageFolderDataset(Dataset):
    """``ds[i] == {"image": PIL RGB, "label": int, "index": i}``; ``ds.classes`` are the class names."""

    def __init__(self, items: Sequence[tuple[Path, int]], classes: Sequence[str], split: str = ""):
        self.items, self.classes, self.split = list(items), list(classes), split
        if not self.items:
            raise DataError(f"image folder split {split!r} has no images")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        path, label = self.items[i]
        return {"image": load_rgb_image(path), "label": int(label), "index": int(i)}

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.items]


def load_imagefolder(data_dir, splits=("train", "val", "test")) -> dict[str, ImageFolderDataset]:
    """Datasets of ``splits``; the class list must be the same in every split."""
    out: dict[str, ImageFolderDataset] = {}
    for split in splits:
        items, classes = load_imagefolder_split(data_dir, split)
        if out:
            first_split, first = next(iter(out.items()))
            if classes != first.classes:
                extra = sorted(set(classes) - set(first.classes))
                missing = sorted(set(first.classes) - set(classes))
                what = f"has class {extra[0]!r} that {first_split!r} lacks" if extra else \
                    f"lacks class {missing[0]!r} of {first_split!r}"
                raise DataError(f"split folder {Path(data_dir) / split} {what} (every split needs the same class "
                                f"folders; {first_split!r} has {len(first.classes)}, {split!r} has {len(classes)})")
        out[split] = ImageFolderDataset(items, classes, split)
    return out


class ImageClassificationCollator:
    """Samples -> ``{"pixel_values", "labels", "index"}`` through the model's image processor."""

    def __init__(self, processor):
        self.image_processor = getattr(processor, "image_processor", processor)
        if not callable(self.image_processor):
            raise ConfigError(f"classification needs an image processor, got {type(processor).__name__}")

    def __call__(self, batch: Sequence[dict]) -> dict[str, torch.Tensor]:
        pixels = self.image_processor(images=[s["image"] for s in batch], return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels, "labels": torch.tensor([s["label"] for s in batch], dtype=torch.long),
                "index": torch.tensor([s["index"] for s in batch], dtype=torch.long)}


__all__ = ["IMAGE_EXTENSIONS", "ImageClassificationCollator", "ImageFolderDataset", "load_imagefolder",
           "load_imagefolder_split"]
