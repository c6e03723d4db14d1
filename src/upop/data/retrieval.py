"""Image-text retrieval data: annotation readers, a torch Dataset and a batch collator.

Two real annotation formats are read (see :func:`load_retrieval_split`):

* BLIP/UPop split files: ``{split}.json``, ``coco_karpathy_{split}.json`` or
  ``flickr30k_{split}.json``; a JSON list of ``{"image": <relative path>, "caption": <str or list>}``.
* The original Karpathy file ``dataset_coco.json`` / ``dataset_flickr30k.json`` / ``dataset_*.json``:
  ``{"images": [{"filepath"?, "filename", "split", "sentences": [{"raw": ...}]}]}``.

Evaluation uses :class:`RetrievalDataset` (one sample per image, captions grouped); training uses
:class:`RetrievalPairs` (one sample per (image, caption) pair, carrying its image index). Every
user mistake raises a one-line :class:`~upop.errors.DataError` naming the file; images are read
by :mod:`upop.data.images`.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from upop.errors import ConfigError, DataError, show
from upop.data._files import not_a_file
from upop.data._problems import collect, report, require_fields
from upop.data.images import load_rgb_image

ANNOTATION_DIRS = ("", "annotation", "annotations")
"""Folders (relative to ``data_dir``) searched for annotation files, in order."""


@dataclass
class RetrievalItem:
    """One image and all its captions."""

    image: Path
    captions: list[str]


def split_file_names(split: str) -> list[str]:
    """BLIP/UPop annotation file names tried for ``split``, in order."""
    return [f"{split}.json", f"coco_karpathy_{split}.json", f"flickr30k_{split}.json"]


def _find_annotation(data_dir: Path, split: str) -> tuple[Path, str]:
    """Return ``(path, "split" | "karpathy")`` for the first annotation file found."""
    folders = [data_dir / sub if sub else data_dir for sub in ANNOTATION_DIRS]
    for folder in folders:
        for name in split_file_names(split):
            if (folder / name).is_file():
                return folder / name, "split"
    for folder in folders:
        found = sorted(p for p in folder.glob("dataset_*.json") if p.is_file()) if folder.is_dir() else []
        if len(found) > 1:
            raise DataError(f"data_dir {show(data_dir)}: several Karpathy files {show([p.name for p in found])} and "
                            f"no split file for split {show(split)} (keep one dataset_*.json or add {split}.json)")
        if found:
            return found[0], "karpathy"
    names = ", ".join(split_file_names(split) + ["dataset_*.json"])
    raise DataError(f"data_dir {show(data_dir)}: no annotation file for split {show(split)} (looked for {names} in "
                    f"the folder and in its {' and '.join(d + '/' for d in ANNOTATION_DIRS if d)} subfolders)")


def read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"annotation file {show(path)}: not UTF-8 text ({show(str(exc))})") from exc
    except OSError as exc:
        raise DataError(f"annotation file {show(path)}: cannot be read ({show(str(exc))})") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"annotation file {show(path)}: invalid JSON at line {exc.lineno} column {exc.colno} "
                        f"({exc.msg})") from exc


def _clean_caption(path: Path, where: str, value: Any) -> str:
    if not isinstance(value, str):
        raise DataError(f"annotation file {show(path)}: {where} has caption {show(value, 80)} (need a string)")
    text = " ".join(value.split())
    if not text:
        raise DataError(f"annotation file {show(path)}: {where} has an empty caption (need non-empty text)")
    return text


def _split_entry(path: Path, i: int, entry: Any) -> tuple[str, list[str], str]:
    """One entry of a BLIP split file as ``(image, captions, where)``."""
    where = f"entry {i}"
    if not isinstance(entry, dict):
        raise DataError(f"annotation file {show(path)}: {where} is {type(entry).__name__} (need an object with "
                        "'image' and 'caption')")
    for key in ("image", "caption"):
        if key not in entry:
            raise DataError(f"annotation file {show(path)}: {where} has no {key!r} field (need 'image' and 'caption')")
    image = entry["image"]
    if not isinstance(image, str) or not image.strip():
        raise DataError(f"annotation file {show(path)}: {where} has image {show(image, 80)} (need a non-empty path "
                        "string)")
    caps = entry["caption"]
    if isinstance(caps, list):
        if not caps:
            raise DataError(f"annotation file {show(path)}: {where} has an empty caption list (need at least one "
                            "caption)")
        caps = [_clean_caption(path, where, c) for c in caps]
    else:
        caps = [_clean_caption(path, where, caps)]
    return image.strip(), caps, where


def _parse_split_file(path: Path, data: Any, problems: list[str] | None = None) -> list[tuple[str, list[str], str]]:
    """Entries of a BLIP split file as ``(image, captions, where)`` (bad ones skipped into ``problems``)."""
    if not isinstance(data, list):
        raise DataError(f"annotation file {show(path)}: top level is {type(data).__name__} (need a JSON list of "
                        "{'image', 'caption'} entries)")
    parsed = (collect(problems, _split_entry, path, i, entry) for i, entry in enumerate(data))
    return [entry for entry in parsed if entry is not None]


def _karpathy_entry(path: Path, i: int, img: Any, wanted: set[str]) -> tuple[str, list[str], str] | None:
    """One image of a Karpathy file as ``(image, captions, where)``; None if it is in another split."""
    where = f"images[{i}]"
    require_fields(path, where, img, ("filename", "split", "sentences"))
    if img["split"] not in wanted:
        return None
    sentences = img["sentences"]
    if not isinstance(sentences, list) or not sentences:
        raise DataError(f"annotation file {show(path)}: {where} has no sentences (need a non-empty list of "
                        "{'raw': caption})")
    caps = []
    for j, s in enumerate(sentences):
        if isinstance(s, dict) and "raw" in s:
            raw = s["raw"]
        elif isinstance(s, dict) and isinstance(s.get("tokens"), list):
            raw = " ".join(str(t) for t in s["tokens"])
        else:
            raise DataError(f"annotation file {show(path)}: {where}.sentences[{j}] has no 'raw' text (need "
                            "{'raw': caption})")
        caps.append(_clean_caption(path, f"{where}.sentences[{j}]", raw))
    rel = Path(str(img.get("filepath") or "")) / str(img["filename"])
    return rel.as_posix(), caps, where


def _parse_karpathy(path: Path, data: Any, split: str,
                    problems: list[str] | None = None) -> list[tuple[str, list[str], str]]:
    """Images of ``split`` in a Karpathy ``dataset_*.json`` (``restval`` counts as train)."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"annotation file {show(path)}: no 'images' list at the top level (need the Karpathy "
                        "layout {'images': [{'filename', 'split', 'sentences'}]})")
    wanted = {split, "restval"} if split == "train" else {split}
    parsed = (collect(problems, _karpathy_entry, path, i, img, wanted) for i, img in enumerate(data["images"]))
    return [entry for entry in parsed if entry is not None]


def check_images_exist(path: Path, images: Sequence[tuple[Path, str]], root: Path,
                       problems: list[str] | None) -> set[Path]:
    """The image files of ``(image, where)`` pairs that are not readable regular files, each
    reported as what it is (missing, a folder, a FIFO, a device, a symbolic link loop...; never
    opened, so a FIFO cannot block).

    Loading for a run stops at the first with a count; a check (``problems`` given) lists every one.
    """
    bad = [(image, where, problem) for image, where in images if (problem := not_a_file(image))]
    if bad and problems is None:
        first, where, problem = bad[0]
        raise DataError(f"annotation file {show(path)}: image file {show(first)} ({where}) {problem} "
                        f"({len(bad)} of {len(images)} images missing or unreadable; paths are relative to "
                        f"{show(root)}, pass image_root=...)")
    for image, where, problem in bad:
        report(problems, f"annotation file {show(path)}: image file {show(image)} ({where}) {problem} "
                         f"(paths are relative to {show(root)})")
    return {image for image, _, _ in bad}


def load_retrieval_split(data_dir, split: str, image_root=None,
                         problems: list[str] | None = None) -> list[RetrievalItem]:
    """Read one split of a retrieval dataset into items (one per image, captions grouped).

    ``data_dir`` holds the annotation file (directly or in ``annotation/`` / ``annotations/``).
    Image paths are relative to ``image_root`` (default ``data_dir``). Entries naming the same
    image are merged, keeping the first-seen order of images and captions. Every image file
    must exist. With ``problems`` (a list), bad entries and missing images are recorded there and
    left out instead of raising; a missing or unreadable annotation file still raises.
    """
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise DataError(f"data_dir {show(data_dir)} does not exist (need a folder with the annotation files)")
    if not data_dir.is_dir():
        raise DataError(f"data_dir {show(data_dir)} is not a directory (need a folder with the annotation files)")
    if not isinstance(split, str) or not split or "/" in split or "\\" in split:
        raise ConfigError(f"split={show(split)} is not allowed (need a name such as 'train', 'val' or 'test')")
    root = Path(image_root) if image_root is not None else data_dir
    if image_root is not None and not root.is_dir():
        raise DataError(f"image_root {show(root)} is not a directory (need the folder the image paths are "
                        "relative to)")
    path, kind = _find_annotation(data_dir, split)
    data = read_json(path)
    entries = (_parse_split_file(path, data, problems) if kind == "split"
               else _parse_karpathy(path, data, split, problems))
    grouped: dict[str, tuple[RetrievalItem, str]] = {}
    for image, caps, where in entries:
        if image in grouped:
            grouped[image][0].captions.extend(caps)
        else:
            grouped[image] = (RetrievalItem(image=root / image, captions=list(caps)), where)
    if not grouped:
        raise DataError(f"annotation file {show(path)}: split {show(split)} has no "
                        f"{'usable ' if problems else ''}items (need at least one image)")
    missing = check_images_exist(path, [(item.image, where) for item, where in grouped.values()], root, problems)
    return [item for item, _ in grouped.values() if item.image not in missing]


class RetrievalDataset(Dataset):
    """Items as a torch Dataset: ``ds[i] == {"image": PIL RGB, "captions": [...], "index": i}``."""

    def __init__(self, items: Sequence[RetrievalItem]):
        self.items = list(items)
        if not self.items:
            raise DataError("retrieval dataset has no items (need at least one image with captions)")

    @classmethod
    def from_split(cls, data_dir, split: str, image_root=None) -> "RetrievalDataset":
        """Shortcut for ``RetrievalDataset(load_retrieval_split(data_dir, split, image_root))``."""
        return cls(load_retrieval_split(data_dir, split, image_root))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = self.items[i]
        return {"image": load_rgb_image(item.image), "captions": list(item.captions), "index": int(i)}

    def flat_captions(self) -> tuple[list[str], list[int], list[list[int]]]:
        """All captions for evaluation: ``(texts, txt2img, img2txt)``.

        ``texts[t]`` belongs to image ``txt2img[t]``; ``img2txt[i]`` lists the text indices of image ``i``.
        """
        return flat_captions(self.items)


def flat_captions(items) -> tuple[list[str], list[int], list[list[int]]]:
    """``(texts, txt2img, img2txt)`` of every caption of ``items`` (objects with ``captions``), in
    order: ``texts[t]`` belongs to image ``txt2img[t]``; ``img2txt[i]`` lists the text indices of image ``i``."""
    texts, txt2img, img2txt = [], [], []
    for i, item in enumerate(items):
        img2txt.append(list(range(len(texts), len(texts) + len(item.captions))))
        texts.extend(item.captions)
        txt2img.extend([i] * len(item.captions))
    return texts, txt2img, img2txt


class RetrievalPairs(Dataset):
    """Training view of a split: one sample per (image, caption) pair, as BLIP's
    ``coco_karpathy_train``, so an epoch covers every caption.

    ``ds[j] == {"image": PIL RGB, "caption": str, "index": image index, "sample": j}``; samples
    with the same ``index`` show the same image (the contrastive losses count them as positives).
    ``items`` keeps the per-image items (captions grouped).
    """

    def __init__(self, items: Sequence[RetrievalItem]):
        self.items = list(items)
        if not self.items:
            raise DataError("retrieval dataset has no items (need at least one image with captions)")
        self.pairs = [(i, c) for i, item in enumerate(self.items) for c in range(len(item.captions))]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, j: int) -> dict:
        i, c = self.pairs[j]
        item = self.items[i]
        return {"image": load_rgb_image(item.image), "caption": item.captions[c], "index": i, "sample": int(j)}


def processor_parts(processor_or_parts) -> tuple[Any, Any]:
    if isinstance(processor_or_parts, dict):
        ip, tok = processor_or_parts.get("image_processor"), processor_or_parts.get("tokenizer")
    elif isinstance(processor_or_parts, (tuple, list)) and len(processor_or_parts) == 2:
        ip, tok = processor_or_parts
    else:
        ip = getattr(processor_or_parts, "image_processor", None)
        tok = getattr(processor_or_parts, "tokenizer", None)
    if not callable(ip) or not callable(tok):
        got = type(processor_or_parts).__name__
        raise ConfigError("RetrievalCollator: need a processor with .image_processor and .tokenizer, an "
                          f"(image_processor, tokenizer) pair or a dict of both, got {got}")
    return ip, tok


class RetrievalCollator:
    """Turn dataset samples into model batches.

    ``collator(batch)`` (training) returns ``{"pixel_values", "input_ids", "attention_mask",
    "index", "sample"}``: a :class:`RetrievalPairs` sample brings its caption; a per-image sample
    (:class:`RetrievalDataset`) gets ONE of its captions, picked with ``random.Random`` seeded by
    ``(seed, epoch, index)`` - deterministic, and different each epoch after :meth:`set_epoch`.
    ``index`` is the image index, ``sample`` the sample's position in its dataset. With a
    ``prompt`` (captioning: BLIP's ``"a picture of "``) each training caption is prefixed with it
    and ``"prompt_length"`` (B,) is its token count without the end token (start token + words).
    For evaluation, :meth:`collate_images` batches images only, and :meth:`encode_texts`
    tokenizes any captions (no prompt).

    ``max_length`` defaults to ``min(tokenizer.model_max_length, 77)``; ``padding`` is
    ``"max_length"`` (fixed shapes) or ``"longest"``.
    """

    def __init__(self, processor_or_parts, *, max_length: int | None = None, padding: str = "max_length",
                 seed: int = 0, prompt: str = ""):
        self.image_processor, self.tokenizer = processor_parts(processor_or_parts)
        if padding not in ("max_length", "longest"):
            raise ConfigError(f"RetrievalCollator: padding={show(padding)} is not allowed (need 'max_length' or "
                              "'longest')")
        if max_length is None:
            max_length = min(int(getattr(self.tokenizer, "model_max_length", 77) or 77), 77)
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ConfigError(f"RetrievalCollator: max_length={max_length!r} is not allowed (need an integer >= 2)")
        self.max_length, self.padding, self.seed, self.epoch = max_length, padding, seed, 0
        if not isinstance(prompt, str):
            raise ConfigError(f"RetrievalCollator: prompt={prompt!r} is not allowed (need a string)")
        self.prompt = prompt
        # BLIP's prompt length: the prompt's tokens without the end token (start token + words)
        self.prompt_length = len(self.tokenizer(prompt)["input_ids"]) - 1 if prompt else 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch used in the caption-choice seed."""
        self.epoch = int(epoch)

    def choose_caption(self, captions: Sequence[str], index: int) -> str:
        """The caption used for sample ``index`` this epoch (deterministic)."""
        return random.Random(f"{self.seed}:{self.epoch}:{int(index)}").choice(list(captions))

    def encode_images(self, items_or_images: Sequence) -> torch.Tensor:
        """Pixel values ``(B, 3, H, W)`` for PIL images or dataset samples (dicts with ``"image"``)."""
        images = [x["image"] if isinstance(x, dict) else x for x in items_or_images]
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def encode_texts(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{"input_ids", "attention_mask"}`` of shape ``(N, L)`` for a list of captions."""
        enc = self.tokenizer(list(texts), padding=self.padding, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def collate_images(self, batch: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Evaluation batch of images: ``{"pixel_values", "index"}``."""
        return {"pixel_values": self.encode_images(batch),
                "index": torch.tensor([int(s["index"]) for s in batch], dtype=torch.long)}

    def __call__(self, batch: Sequence[dict]) -> dict[str, torch.Tensor]:
        texts = [s["caption"] if "caption" in s else self.choose_caption(s["captions"], s["index"]) for s in batch]
        out = {**self.collate_images(batch), **self.encode_texts([self.prompt + t for t in texts]),
               "sample": torch.tensor([int(s.get("sample", s["index"])) for s in batch], dtype=torch.long)}
        if self.prompt:
            out["prompt_length"] = torch.full((len(batch),), self.prompt_length, dtype=torch.long)
        return out


def make_clip_processor(image_size: int, tokenizer):
    """A ``CLIPProcessor`` with the PIL CLIP image processor (no torchvision) and ``tokenizer``.

    Images are resized so the shortest edge is ``image_size``, centre-cropped to a square and
    normalised with the OpenAI CLIP mean/std. Reload a saved one with :func:`load_processor`.
    """
    from transformers import CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 8 <= image_size <= 4096:
        raise ConfigError(f"make_clip_processor: image_size={image_size!r} is not allowed "
                          "(need an integer in [8, 4096])")
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def load_processor(path):
    """Load a processor saved with ``save_pretrained`` from a local folder, forcing the PIL backend.

    ``AutoProcessor.from_pretrained(path)`` alone also works when torchvision is absent (transformers
    falls back to ``CLIPImageProcessorPil``); ``backend="pil"`` keeps it working when torchvision is
    installed but broken.
    """
    from transformers import AutoProcessor

    path = Path(path)
    if not path.is_dir():
        raise DataError(f"processor folder {show(path)} does not exist (need a folder written by save_pretrained)")
    return AutoProcessor.from_pretrained(str(path), backend="pil", trust_remote_code=False)
