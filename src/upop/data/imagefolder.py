"""ImageFolder classification data: ``DIR/{train,val,test}/<class_name>/*.png|jpg|jpeg``.

Each sub-folder of a split is a class; classes are sorted by name, and every split must have the
same classes. Only the files directly inside a class folder with an image extension (``.png``,
``.jpg``, ``.jpeg``, any case) are read; other files are ignored. Images are decoded by
:mod:`upop.data.images` when a sample is read.

A sample's ``label`` is the model's id of its class: the position of the class in the sorted
folder list until :meth:`ImageFolderDataset.set_label_ids` maps class positions to the model's
``id2label`` ids (the classification task does this, :mod:`upop.data.labels`). Every mistake is
a one-line :class:`~upop.errors.DataError` naming the file or folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset

from upop.errors import ConfigError, DataError, show
from upop.data._files import image_files
from upop.data._problems import report
from upop.data.augment import center_crop_eval, check_augment, deit_params, input_size, normalize
from upop.data.images import load_rgb_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def _split_dir(data_dir, split: str) -> Path:
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data_dir {show(root)} is not a directory (need DIR/{{train,val,test}}/<class>/*.png|jpg)")
    if not isinstance(split, str) or not split or "/" in split or "\\" in split:
        raise ConfigError(f"split={show(split)} is not allowed (need a name such as 'train', 'val' or 'test')")
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"split folder {show(folder)} does not exist (ImageFolder layout: "
                        f"{show(root)}/{split}/<class_name>/*.png)")
    return folder


def load_imagefolder_split(data_dir, split: str,
                           problems: list[str] | None = None) -> tuple[list[tuple[Path, int]], list[str]]:
    """``(items, classes)`` of one split: items are ``(image path, class index)`` sorted by class, file.

    A class folder without images is an error (recorded in ``problems`` when it is a list).
    """
    folder = _split_dir(data_dir, split)
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"split folder {show(folder)} has no class sub-folders (need {show(folder)}/<class_name>/"
                        "*.png)")
    items = []
    for index, name in enumerate(classes):
        files = image_files((folder / name).iterdir(), IMAGE_EXTENSIONS, problems)
        if not files:
            report(problems, f"class folder {show(folder / name)} has no images (need *.png, *.jpg or *.jpeg files)")
        items.extend((p, index) for p in files)
    return items, classes


def class_difference(split_dir: Path, classes: Sequence[str], first_split: str, first: Sequence[str]) -> str | None:
    """The one-line problem when a split's classes differ from the first split's, else None."""
    if list(classes) == list(first):
        return None
    extra = sorted(set(classes) - set(first))
    missing = sorted(set(first) - set(classes))
    what = (f"has class {show(extra[0])} that {show(first_split)} lacks" if extra
            else f"lacks class {show(missing[0])} of {show(first_split)}")
    return (f"split folder {show(split_dir)} {what} (every split needs the same class folders; {show(first_split)} "
            f"has {len(first)}, {show(split_dir.name)} has {len(classes)})")


class ImageFolderDataset(Dataset):
    """``ds[i] == {"image": PIL RGB, "label": int, "index": i}``; ``ds.classes`` are the class names."""

    def __init__(self, items: Sequence[tuple[Path, int]], classes: Sequence[str], split: str = ""):
        self.items, self.classes, self.split = list(items), list(classes), split
        self.label_ids = list(range(len(self.classes)))
        if not self.items:
            raise DataError(f"image folder split {show(split)} has no images")

    def set_label_ids(self, label_ids: Sequence[int]) -> None:
        """Label sample ``i`` with ``label_ids[class position]`` (the model's id of the class)."""
        if len(label_ids) != len(self.classes):
            raise ValueError(f"need one label id per class ({len(self.classes)}), got {len(label_ids)}")
        self.label_ids = [int(x) for x in label_ids]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        path, index = self.items[i]
        return {"image": load_rgb_image(path), "label": self.label_ids[index], "index": int(i)}

    @property
    def labels(self) -> list[int]:
        return [self.label_ids[index] for _, index in self.items]


def load_imagefolder(data_dir, splits=("train", "val", "test")) -> dict[str, ImageFolderDataset]:
    """Datasets of ``splits``; the class list must be the same in every split."""
    out: dict[str, ImageFolderDataset] = {}
    for split in splits:
        items, classes = load_imagefolder_split(data_dir, split)
        if out:
            first_split, first = next(iter(out.items()))
            problem = class_difference(Path(data_dir) / split, classes, first_split, first.classes)
            if problem:
                raise DataError(problem)
        out[split] = ImageFolderDataset(items, classes, split)
    return out


class ImageClassificationCollator:
    """Samples -> ``{"pixel_values", "labels", "index"}`` through the model's image processor.

    ``augment="none"``: every image is resized by the processor (training and evaluation alike).
    ``augment="deit"``: training batches hold the first half of DeiT's recipe
    (:func:`~upop.data.augment.deit_params`): ``"pixel_values"`` are uint8 random crops at the
    input size, and the ``aug_*`` entries the random choices of the rest, drawn from ``(seed,
    epoch, sample index)``; with them ``"mix_partner"`` (B,) the batch position each sample is
    mixed with and ``"mix_weight"`` (B,) the weight of its own label. The task's loss finishes the
    recipe on the batch's device (:func:`upop.data.augment_batch.augment_batch`) and builds the
    smoothed targets. :meth:`collate_eval` is the evaluation batch.
    """

    def __init__(self, processor, augment: str = "none", seed: int = 0):
        self.image_processor = getattr(processor, "image_processor", processor)
        if not callable(self.image_processor):
            raise ConfigError(f"classification needs an image processor, got {type(processor).__name__}")
        self.augment, self.seed, self.epoch = check_augment(augment), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the augmentation's seed."""
        self.epoch = int(epoch)

    @staticmethod
    def _labels(batch: Sequence[dict]) -> dict[str, torch.Tensor]:
        return {"labels": torch.tensor([s["label"] for s in batch], dtype=torch.long),
                "index": torch.tensor([s["index"] for s in batch], dtype=torch.long)}

    def __call__(self, batch: Sequence[dict]) -> dict[str, torch.Tensor]:
        if self.augment == "none":
            pixels = self.image_processor(images=[s["image"] for s in batch], return_tensors="pt")["pixel_values"]
            return {"pixel_values": pixels, **self._labels(batch)}
        params = deit_params([s["image"] for s in batch], [s["index"] for s in batch], self.image_processor,
                             self.seed, self.epoch)
        return {"pixel_values": params.pop("pixel_values"), **self._labels(batch), **params}

    def collate_eval(self, batch: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Evaluation batch: DeiT's resize and centre crop for images larger than the input
        (:func:`~upop.data.augment.center_crop_eval`), the processor's resize for the others."""
        size = input_size(self.image_processor)
        crops = [center_crop_eval(s["image"], size) for s in batch]
        if all(c is None for c in crops):  # one processor call, as in training without augmentation
            pixels = self.image_processor(images=[s["image"] for s in batch], return_tensors="pt")["pixel_values"]
        else:
            pixels = torch.stack([normalize(self.image_processor, [c])[0] if c is not None else
                                  self.image_processor(images=[s["image"]], return_tensors="pt")["pixel_values"][0]
                                  for c, s in zip(crops, batch)])
        return {"pixel_values": pixels, **self._labels(batch)}


__all__ = ["IMAGE_EXTENSIONS", "ImageClassificationCollator", "ImageFolderDataset", "class_difference",
           "load_imagefolder", "load_imagefolder_split"]
