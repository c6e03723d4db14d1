"""NLVR2 data: two images, one statement, a True/False label.

Supported layouts for split ``S`` of ``data_dir`` (searched directly and in ``annotation/`` /
``annotations/``):

* BLIP/UPop JSON: ``S.json`` or ``nlvr_S.json`` — a list of ``{"images": [path0, path1],
  "sentence", "label": "True" | "False" | true | false}`` (paths relative to ``data_dir``).
* Official NLVR2 JSON lines: ``S.jsonl`` (or ``S.json`` holding one object per line), entries
  ``{"identifier": "split-set-pair-sentence", "sentence", "label"}``; the images are
  ``images/S/{identifier without the last part}-img0.png`` and ``-img1.png`` (the layout of the
  NLVR2 image archives); the URLs ``left_url``/``right_url`` are not downloaded.

Every problem raises a one-line :class:`~upop.errors.DataError` naming the file and the entry
(or, given ``problems=[]``, is recorded there and the entry skipped: ``upop data check``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset

from upop.errors import ConfigError, DataError, show
from upop.data._problems import collect, collect_list, require_fields
from upop.data.images import load_rgb_image
from upop.data.retrieval import ANNOTATION_DIRS, processor_parts, read_json, check_images_exist

_LABELS = {"true": 1, "false": 0}


@dataclass
class NLVRItem:
    """A pair of images, a statement about them and whether it is true (1) or false (0)."""

    images: tuple[Path, Path]
    sentence: str
    label: int


def _label(path: Path, where: str, value) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in _LABELS:
        return _LABELS[value.strip().lower()]
    raise DataError(f"annotation file {show(path)}: {where} has label {show(value, 40)} (need 'True' or 'False')")


def _sentence(path: Path, where: str, value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"annotation file {show(path)}: {where} has sentence {show(value, 80)} (need a non-empty "
                        "string)")
    return " ".join(value.split())


def _blip_item(path: Path, i: int, entry, root: Path) -> NLVRItem:
    where = f"entry {i}"
    require_fields(path, where, entry, ("images", "sentence", "label"))
    imgs = entry["images"]
    if not isinstance(imgs, list) or len(imgs) != 2 or not all(isinstance(p, str) and p for p in imgs):
        raise DataError(f"annotation file {show(path)}: {where} has images {show(imgs, 120)} (need a list of two "
                        "paths)")
    return NLVRItem((root / imgs[0], root / imgs[1]), _sentence(path, where, entry["sentence"]),
                    _label(path, where, entry["label"]))


def _blip_items(path: Path, data, root: Path, problems: list[str] | None = None) -> list[NLVRItem]:
    return collect_list(problems, _blip_item, path, data, root, "{'images', 'sentence', 'label'}")


def _jsonl_item(path: Path, n: int, line: str, folder: Path) -> NLVRItem:
    where = f"line {n}"
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"annotation file {show(path)}: {where} is not valid JSON ({exc.msg})") from None
    if not isinstance(entry, dict) or not all(k in entry for k in ("identifier", "sentence", "label")):
        raise DataError(f"annotation file {show(path)}: {where} has no 'identifier', 'sentence' or 'label' field")
    ident = str(entry["identifier"]).rsplit("-", 1)[0]
    return NLVRItem((folder / f"{ident}-img0.png", folder / f"{ident}-img1.png"),
                    _sentence(path, where, entry["sentence"]), _label(path, where, entry["label"]))


def _jsonl_items(path: Path, text: str, root: Path, split: str, problems: list[str] | None = None) -> list[NLVRItem]:
    folder = root / "images" / split
    items = (collect(problems, _jsonl_item, path, n, line, folder)
             for n, line in enumerate(text.splitlines(), start=1) if line.strip())
    return [it for it in items if it is not None]


def load_nlvr_split(data_dir, split: str, image_root=None, problems: list[str] | None = None) -> list[NLVRItem]:
    """Read split ``split`` of an NLVR2 dataset (either layout, see the module doc) into items.

    With ``problems`` (a list), bad entries and missing images are recorded there and left out.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data_dir {show(data_dir)} is not an existing directory (need a folder with the annotation "
                        "files)")
    if not isinstance(split, str) or not split or "/" in split:
        raise ConfigError(f"split={show(split)} is not allowed (need a name such as 'train', 'val' or 'test')")
    root = Path(image_root) if image_root is not None else data_dir
    path = None
    for folder in (data_dir / sub if sub else data_dir for sub in ANNOTATION_DIRS):
        for name in (f"{split}.json", f"nlvr_{split}.json", f"{split}.jsonl"):
            if (folder / name).is_file():
                path = folder / name
                break
        if path:
            break
    if path is None:
        raise DataError(f"data_dir {show(data_dir)}: no NLVR2 annotation file for split {show(split)} (looked for "
                        f"{split}.json, nlvr_{split}.json and {split}.jsonl)")
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    if path.suffix == ".jsonl" or (text.lstrip().startswith("{") and "\n{" in text.strip()):
        items = _jsonl_items(path, text, root, split, problems)
    else:
        items = _blip_items(path, read_json(path), root, problems)
    if not items:
        raise DataError(f"annotation file {show(path)}: split {show(split)} has no "
                        f"{'usable ' if problems else ''}statements")
    first_use: dict[Path, str] = {}
    for i, it in enumerate(items):
        for img in it.images:
            first_use.setdefault(img, f"statement {i}")
    missing = check_images_exist(path, list(first_use.items()), root, problems)
    return [it for it in items if not missing.intersection(it.images)]


class NLVRDataset(Dataset):
    """``ds[i] == {"images": (PIL, PIL), "sentence", "label", "index": i}``."""

    def __init__(self, items: Sequence[NLVRItem]):
        self.items = list(items)
        if not self.items:
            raise DataError("NLVR2 dataset has no statements")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        it = self.items[i]
        return {"images": tuple(load_rgb_image(p) for p in it.images), "sentence": it.sentence,
                "label": it.label, "index": int(i)}


class NLVRCollator:
    """Batch ``{"pixel_values": (B, 2, 3, H, W), "input_ids", "attention_mask", "labels": (B,)}``."""

    def __init__(self, processor, max_length: int = 32):
        self.image_processor, self.tokenizer = processor_parts(processor)
        self.max_length = max_length

    def __call__(self, samples) -> dict:
        flat = [img for s in samples for img in s["images"]]
        pixels = self.image_processor(images=flat, return_tensors="pt")["pixel_values"]
        pixels = pixels.reshape(len(samples), 2, *pixels.shape[1:])
        enc = self.tokenizer([s["sentence"] for s in samples], padding="longest", truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        return {"pixel_values": pixels, "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": torch.tensor([int(s["label"]) for s in samples], dtype=torch.long)}
