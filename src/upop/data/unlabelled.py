"""Unlabelled data for label-free compression (the ``distill`` task): images and/or sentences.

Layout of a data folder ``DIR`` (no labels, no annotation files, no split folders)::

    DIR/images/**/*.png|jpg|jpeg|webp|bmp|gif|tif|tiff   images, in any sub-folders
    DIR/texts.txt                                        one sentence per line (UTF-8)

Without an ``images/`` folder the image files directly inside ``DIR`` are read instead (not its
sub-folders). Either part may be missing; which one a model needs is checked when the task
meets the model (:meth:`UnlabelledDataset.use`). Hidden files and folders (``.name``) are
skipped; blank lines of ``texts.txt`` are ignored and each line is stripped of surrounding
white space.

Splits are made from the data itself, deterministically: every distinct image file (its path
relative to the image folder) and every distinct sentence gets a fixed hash
(:func:`split_position`, BLAKE2b of :data:`SPLIT_SALT` and the key); 5% go to ``val``, 5% to
``test`` and the rest to ``train``. The assignment of a file does not depend on the other files
(adding data never moves an existing file to another split); duplicate sentences always land in
the same split. When ``val`` or ``test`` would be empty, the lowest-hashed key of the largest
split moves there, so each split has at least one; a part with fewer than
:data:`MIN_DISTINCT` distinct keys cannot be split and is refused, in one line, by the task
that needs it. Images are decoded by :mod:`upop.data.images` when a sample is read (a damaged
file is a one-line :class:`~upop.errors.DataError` naming it).
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset

from upop.errors import ConfigError, DataError, show
from upop.data._problems import report
from upop.data.images import load_rgb_image

IMAGE_DIR = "images"
TEXT_FILE = "texts.txt"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SPLITS = ("train", "val", "test")
#: share of the distinct keys that goes to each held-out split (the rest is ``train``)
HELD_OUT = {"val": 0.05, "test": 0.05}
#: fewest distinct images (or sentences) a part needs: one each for train, val and test
MIN_DISTINCT = 3
#: fixed salt of the split hash (changing it would move files between splits)
SPLIT_SALT = b"upop-distill-split-v1"
LAYOUT = f"DIR/{IMAGE_DIR}/**/*.png|jpg|... and/or DIR/{TEXT_FILE}, one sentence per line"


def split_position(key: str) -> float:
    """The key's fixed position in ``[0, 1)``: ``< 0.05`` is ``val``, ``< 0.10`` ``test``, else ``train``."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8, key=SPLIT_SALT).digest()
    return int.from_bytes(digest, "big") / 2**64


def assign_splits(keys: Sequence[str]) -> dict[str, list[int]]:
    """Positions of ``keys`` in each split, by :func:`split_position` of each distinct key
    (equal keys share a split); each split gets at least one distinct key. Needs at least
    :data:`MIN_DISTINCT` distinct keys (the caller checks)."""
    position = {k: split_position(k) for k in dict.fromkeys(keys)}
    chosen: dict[str, list[str]] = {s: [] for s in SPLITS}
    for key, u in position.items():
        chosen["val" if u < HELD_OUT["val"] else "test" if u < HELD_OUT["val"] + HELD_OUT["test"] else "train"
               ].append(key)
    for split in SPLITS:  # a split left empty takes the lowest-hashed key of the largest split
        if not chosen[split]:
            donor = max(SPLITS, key=lambda s: (len(chosen[s]), s == "train"))
            key = min(chosen[donor], key=position.__getitem__)
            chosen[donor].remove(key)
            chosen[split].append(key)
    where = {key: split for split, ks in chosen.items() for key in ks}
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for i, key in enumerate(keys):
        out[where[key]].append(i)
    return out


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def find_images(data_dir) -> tuple[Path, list[Path]]:
    """``(image folder, image files sorted by relative path)``: ``DIR/images`` searched recursively,
    or the image files directly inside ``DIR`` when there is no ``images`` folder."""
    root = Path(data_dir)
    folder = root / IMAGE_DIR
    if folder.is_dir():
        candidates = folder.rglob("*")
    else:
        folder, candidates = root, root.iterdir()
    files = [p for p in candidates
             if p.suffix.lower() in IMAGE_SUFFIXES and _visible(p, folder) and p.is_file()]
    return folder, sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def read_texts(data_dir, problems: list[str] | None = None) -> list[str]:
    """The non-blank lines of ``DIR/texts.txt``, stripped ([] when there is no such file)."""
    path = Path(data_dir) / TEXT_FILE
    if not path.exists():
        return []
    if not path.is_file():
        report(problems, f"{show(path)} is not a file (need a UTF-8 text file, one sentence per line)")
        return []
    try:
        raw = path.read_bytes()
    except OSError as exc:
        report(problems, f"text file {show(path)} cannot be read ({type(exc).__name__}: {show(str(exc))})")
        return []
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        report(problems, f"text file {show(path)} is not UTF-8 text (line {line}, byte {exc.start}); save it as "
                         "UTF-8, one sentence per line")
        return []
    return [s for s in (line.strip() for line in text.splitlines()) if s]


class UnlabelledDataset(Dataset):
    """One split of an unlabelled folder: ``images`` (paths) and ``texts`` (sentences).

    ``ds[i]`` is ``{"index": i, "image": PIL RGB, "text": str}`` with only the parts in use
    (:meth:`use`; by default every part the split has). With both parts the length is the
    larger count and the shorter list is cycled (``i % n``): the pairs carry no meaning, a
    two-tower model simply sees a batch of images and a batch of sentences together.
    """

    def __init__(self, images: Sequence[Path], texts: Sequence[str], split: str = "", root: Path | None = None,
                 missing: dict[str, str] | None = None):
        self.images, self.texts, self.split = list(images), list(texts), split
        self.root = Path(root) if root is not None else None
        #: part -> why it cannot be used ("images"/"texts"), for :meth:`use`
        self.missing = dict(missing or {})
        self.parts = tuple(p for p, items in (("images", self.images), ("texts", self.texts)) if items)
        if not self.parts:
            raise DataError(f"unlabelled split {show(split)} has neither images nor texts ({LAYOUT})")

    def use(self, images: bool, texts: bool, who: str = "the model") -> None:
        """Yield only the parts ``who`` needs; a needed part the data lacks is a DataError."""
        for part, needed in (("images", images), ("texts", texts)):
            if needed and not getattr(self, part):
                why = self.missing.get(part) or f"split {show(self.split)} has no {part}"
                raise DataError(f"{who} needs {part} but {why} ({LAYOUT})")
        self.parts = tuple(p for p, needed in (("images", images), ("texts", texts)) if needed)

    def __len__(self) -> int:
        return max(len(getattr(self, part)) for part in self.parts)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        sample: dict = {"index": int(i)}
        if "images" in self.parts:
            sample["image"] = self.image(i % len(self.images))
        if "texts" in self.parts:
            sample["text"] = self.texts[i % len(self.texts)]
        return sample

    def image(self, j: int):
        """Image ``j`` of the split, decoded as RGB."""
        return load_rgb_image(self.images[j])

    @property
    def items(self) -> list[str]:
        """What defines the split (for a run's fingerprint): image paths relative to the image
        folder, then the sentences."""
        names = [p.relative_to(self.root).as_posix() if self.root and p.is_relative_to(self.root) else str(p)
                 for p in self.images]
        return [f"image:{n}" for n in names] + [f"text:{t}" for t in self.texts]


def _part_splits(keys: list[str], what: str, where: str) -> tuple[dict[str, list[int]] | None, str]:
    """Split positions of one part, or None and why it cannot be split."""
    distinct = len(set(keys))
    if distinct < MIN_DISTINCT:
        return None, (f"{where} has {distinct} distinct {what}; need at least {MIN_DISTINCT} (one each for train, "
                      "val and test)")
    return assign_splits(keys), ""


def load_unlabelled(data_dir, splits: Sequence[str] = SPLITS) -> dict[str, UnlabelledDataset]:
    """The ``splits`` of the unlabelled folder ``data_dir`` (see the module docstring)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data folder {show(root)} is not a directory (need {LAYOUT})")
    for split in splits:
        if split not in SPLITS:
            raise ConfigError(f"split={show(split)} is not allowed for unlabelled data (need one of "
                              f"{', '.join(SPLITS)}; the splits are made from the files)")
    folder, images = find_images(root)
    texts = read_texts(root)
    image_keys = [p.relative_to(folder).as_posix() for p in images]
    image_splits, no_images = _part_splits(image_keys, "images", f"image folder {show(folder)}")
    text_file = root / TEXT_FILE
    if text_file.exists():
        text_splits, no_texts = _part_splits(texts, "sentences", f"text file {show(text_file)}")
    else:
        text_splits, no_texts = None, f"there is no text file {show(text_file)}"
    if image_splits is None and text_splits is None:
        raise DataError(f"data folder {show(root)} has too little data: {no_images}; {no_texts} ({LAYOUT})")
    missing = {"images": no_images, "texts": no_texts}
    return {split: UnlabelledDataset([images[i] for i in image_splits[split]] if image_splits else [],
                                     [texts[i] for i in text_splits[split]] if text_splits else [],
                                     split, root=folder, missing=missing)
            for split in splits}


#: what an image processor's output holds for the model: pixels, and NaFlex's patch mask and grid
IMAGE_KEYS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")


def processor_parts(processor) -> tuple[object | None, object | None]:
    """``(image processor, tokenizer)`` of a processor, an image processor alone or a tokenizer alone."""
    image_processor = getattr(processor, "image_processor", None)
    tokenizer = getattr(processor, "tokenizer", None)
    if image_processor is None and tokenizer is None and processor is not None:
        names = tuple(getattr(processor, "model_input_names", ()) or ())
        if "pixel_values" in names:
            image_processor = processor
        elif "input_ids" in names:
            tokenizer = processor
    return image_processor, tokenizer


def default_text_length(tokenizer, model_limit: int | None = None) -> int:
    """Token limit of a sentence: the tokenizer's ``model_max_length`` (at most 512) and the
    model's position limit ``model_limit`` when known."""
    limit = getattr(tokenizer, "model_max_length", None)
    limit = int(limit) if isinstance(limit, int) and 2 <= limit <= 512 else 512
    return min(limit, int(model_limit)) if model_limit else limit


class UnlabelledCollator:
    """Samples -> ``{"index", "pixel_values"?, "input_ids"?, "attention_mask"?}`` (and a NaFlex
    processor's ``pixel_attention_mask``, ``spatial_shapes`` with the images).

    Images go through the processor's image processor (its resize, no augmentation) and
    sentences through its tokenizer (padded to the longest of the batch, cut at ``max_length``
    tokens, :func:`default_text_length` by default); a part absent from the samples is absent
    from the batch. :meth:`encode_images` and :meth:`encode_texts` serve evaluation.
    """

    def __init__(self, processor, max_length: int | None = None):
        self.image_processor, self.tokenizer = processor_parts(processor)
        if self.image_processor is None and self.tokenizer is None:
            raise ConfigError(f"the distill task needs an image processor and/or a tokenizer, got "
                              f"{type(processor).__name__}")
        self.max_length = max_length

    def encode_images(self, images: Sequence) -> dict[str, torch.Tensor]:
        """``{"pixel_values"}`` and, for a NaFlex image processor (SigLIP2), its
        ``pixel_attention_mask`` and ``spatial_shapes``."""
        if self.image_processor is None:
            raise ConfigError("the processor has no image processor, but the data has images for the model")
        enc = self.image_processor(images=list(images), return_tensors="pt")
        return {k: enc[k] for k in IMAGE_KEYS if k in enc}

    def encode_texts(self, texts: Sequence[str], padding="longest", max_length: int | None = None) -> dict:
        if self.tokenizer is None:
            raise ConfigError("the processor has no tokenizer, but the data has sentences for the model")
        length = max_length or self.max_length or default_text_length(self.tokenizer)
        enc = self.tokenizer(list(texts), padding=padding, truncation=True, max_length=length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def __call__(self, batch: Sequence[dict]) -> dict[str, torch.Tensor]:
        out = {"index": torch.tensor([int(s["index"]) for s in batch], dtype=torch.long)}
        if batch and "image" in batch[0]:
            out.update(self.encode_images([s["image"] for s in batch]))
        if batch and "text" in batch[0]:
            out.update(self.encode_texts([s["text"] for s in batch]))
        return out


def check_split(root: Path, split: str, files, problems: list[str]) -> dict[str, int]:
    """``upop data check`` of one split (the checker signature of :mod:`upop.data.check`):
    every image of the split is checked by ``files``; a problem of ``texts.txt`` or of the
    folder as a whole is recorded once, not once per split."""
    try:
        ds = load_unlabelled(root, (split,))[split]
    except DataError as exc:
        if str(exc) not in problems:
            problems.append(str(exc))
        return {"images": 0, "texts": 0}
    return {"images": files.images(ds.images), "texts": len(ds.texts)}


def write_unlabelled(out_dir, *, train: int = 2000, val: int = 200, test: int = 200, image_size: int = 64,
                     seed: int = 0) -> dict:
    """Write a Shapes data set in the unlabelled layout: ``images/shape_{i:05d}.png`` and
    ``texts.txt`` (one caption of each scene), ``train + val + test`` of each; the counts only
    size the set (the splits are made from the file names, see :func:`assign_splits`).
    Returns ``{"out_dir", "settings", "splits": {split: {"images", "texts"}}}``."""
    from upop.data.shapes import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, check_int, atomic_save_png, captions, make_scene, render

    w = "write_unlabelled"
    total = sum(check_int(w, name, n, 1) for name, n in (("train", train), ("val", val), ("test", test)))
    check_int(w, "image_size", image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
    check_int(w, "seed", seed, -(2 ** 63))
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{w}: out_dir {show(out)} exists and is not a directory")
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(total):
        rng = random.Random(f"upop-shapes-unlabelled:{seed}:{i}")
        scene = make_scene(rng)
        lines.extend(captions(scene, rng, 1))
        atomic_save_png(render(scene, image_size), out / IMAGE_DIR / f"shape_{i:05d}.png")
    for stale in (out / IMAGE_DIR).glob("shape_*.png"):  # left by an earlier, larger set
        if stale.stem[6:].isdigit() and int(stale.stem[6:]) >= total:
            stale.unlink()
    (out / TEXT_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    splits = load_unlabelled(out)
    return {"out_dir": str(out), "settings": {"format": "upop-shapes-unlabelled", "seed": seed,
                                              "image_size": image_size, "samples": total},
            "splits": {s: {"images": len(d.images), "texts": len(d.texts)} for s, d in splits.items()}}


__all__ = ["IMAGE_SUFFIXES", "LAYOUT", "MIN_DISTINCT", "SPLITS", "UnlabelledCollator", "UnlabelledDataset",
           "assign_splits", "check_split", "default_text_length", "find_images", "load_unlabelled",
           "processor_parts", "read_texts", "split_position", "write_unlabelled"]
