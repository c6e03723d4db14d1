"""Users' data as they have it: ``upop.compress(train=..., val=..., test=...)`` from Python.

A split may be a ``datasets.Dataset``, a map-style torch ``Dataset`` whose rows are dicts, or a
list of dicts. Each task declares the rows it reads in one place, its :class:`RowSchema`
(``Task.row_schema``): the raw fields it needs (all of ``required``, at least one of
``any_of``), the optional ones, the other names it accepts for them, a field that may come as
several (``parts``: a pair of images as ``image0`` + ``image1``), and the Trainer-style fields
(already processed tensors: ``pixel_values``, ``labels``, ``input_ids``, ``attention_mask``) it
can take as they are. :func:`adapt_splits` reads that schema (no task is named here) and turns
each split into what the task's collator and evaluation read, with the schema's layout
(:data:`LAYOUTS`):

* raw rows keep their values (a PIL image or an image file path, a label id, a caption, a
  question and its answers, a segmentation mask); ``index`` is the row's position when the rows
  have none;
* ``columns={"ours": "theirs"}`` names a field the rows call otherwise;
* Trainer-style rows are fed as they are: their tensors are wrapped (:class:`Pixels`,
  :class:`Tokens`) and the processor is wrapped (:func:`pass_through`) so that the task's own
  collator stacks and pads them instead of processing them again; the processor saves as the
  one given;
* ``RowSchema.finish(task, splits)``, where a task declares one, then sees every adapted split
  (what one split needs of another: VQA's candidate answers come from the training rows).

A dataset of upop's own readers (``Task.load_splits``) is taken as it is; a task without a
schema takes torch Datasets as they are. A ``DataLoader`` or any other iterable is refused: upop
batches itself. Every mistake is one :class:`~upop.errors.DataError` line naming the split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset

from upop.data.ade20k import IGNORE_INDEX
from upop.data.augment import input_size
from upop.data.images import LABEL_MODES, load_label_map, load_rgb_image
from upop.data.retrieval import flat_captions
from upop.data.unlabelled import UnlabelledDataset
from upop.errors import DataError, show

#: what each Trainer-style field stands for among a task's raw fields (the transformers
#: conventions: a processor's outputs and the Trainer's ``labels``)
TRAINER_FIELDS = {"pixel_values": "image", "labels": "label", "input_ids": "caption", "attention_mask": "caption"}


@dataclass(frozen=True)
class RowSchema:
    """The rows a task reads from Python (``Task.row_schema``).

    ``required`` / ``any_of`` / ``optional``: the raw fields (all of ``required``; at least one
    of ``any_of``, e.g. images and/or sentences); ``aliases``: other names accepted for a field,
    in order; ``parts``: a field the rows may give as several fields instead (``{"images":
    ("image0", "image1")}``: a pair, or each image in its own field); ``trainer`` /
    ``trainer_any_of`` / ``trainer_optional``: the Trainer-style fields the task takes as they
    are, all of the first and at least one of the second (both empty: it needs raw fields,
    ``raw_only`` says why); ``trainer_needs``: task settings Trainer-style rows need (e.g.
    ``{"augment": "none"}``: DeiT's crops need raw images); ``layout``: how rows become the
    task's data set (:data:`LAYOUTS`); ``finish(task, splits)``: called once every split is
    adapted (``{split: dataset or None}``), for what one split takes from another."""

    required: tuple[str, ...]
    optional: tuple[str, ...] = ("index",)
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    trainer: tuple[str, ...] = ()
    trainer_optional: tuple[str, ...] = ()
    trainer_needs: Mapping[str, str] = field(default_factory=dict)
    raw_only: str = ""
    layout: str = "rows"
    any_of: tuple[str, ...] = ()
    parts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    trainer_any_of: tuple[str, ...] = ()
    finish: Callable[[Any, dict], None] | None = field(default=None, compare=False)

    @property
    def takes_trainer(self) -> bool:
        """Whether the task takes Trainer-style rows at all."""
        return bool(self.trainer or self.trainer_any_of)

    def fields(self) -> tuple[str, ...]:
        """Every name ``columns=`` may map: raw fields (and their parts) and Trainer-style fields."""
        parts = (p for f in (*self.required, *self.any_of, *self.optional) for p in self.parts.get(f, ()))
        return tuple(dict.fromkeys((*self.required, *self.any_of, *self.optional, *parts, *self.trainer,
                                    *self.trainer_any_of, *self.trainer_optional)))

    def accepted(self, ours: str) -> str:
        """The names rows may give field ``ours`` under, for messages: ``images; or image0/left +
        image1/right``."""
        text = ", ".join((ours, *self.aliases.get(ours, ())))
        if ours in self.parts:
            text += "; or " + " + ".join("/".join((p, *self.aliases.get(p, ()))) for p in self.parts[ours])
        return text

    def trainer_wants(self) -> str:
        """The Trainer-style fields the rows need, in words (empty: none are taken)."""
        return " + ".join((*self.trainer, *([" and/or ".join(self.trainer_any_of)] if self.trainer_any_of else ())))

    def wants(self) -> str:
        """The raw fields the rows need, in words: ``image, label`` or ``image and/or text``."""
        return ", ".join((*self.required, *([" and/or ".join(self.any_of)] if self.any_of else ())))

    def doc_cells(self) -> tuple[str, str, str, str]:
        """The cells of this schema's row in ``docs/data.md`` (required, optional, aliases,
        Trainer-style); the doc's table is compared with these by the tests."""
        def names(items) -> str:
            return ", ".join(f"`{n}`" for n in items) or "-"

        def needed(name: str) -> str:
            parts = self.parts.get(name)
            return f"`{name}` (or {' + '.join(f'`{p}`' for p in parts)})" if parts else f"`{name}`"

        required = [needed(n) for n in self.required]
        if self.any_of:
            required.append(" and/or ".join(needed(n) for n in self.any_of))
        aliases = "; ".join(f"`{k}`: {names(v)}" for k, v in self.aliases.items()) or "-"
        trainer = " + ".join([*(f"`{n}`" for n in self.trainer),
                              *([" and/or ".join(f"`{n}`" for n in self.trainer_any_of)] if self.trainer_any_of
                                else [])]) or "no"
        if self.trainer_optional:
            trainer += f" (+ {names(self.trainer_optional)})"
        if self.trainer_needs:
            trainer += " with " + ", ".join(f"{k}={v}" for k, v in self.trainer_needs.items())
        return ", ".join(required) or "-", names(self.optional), aliases, trainer


# processed inputs, passed through the task's collator ----------------------------------------


class Pixels:
    """One image's processed ``pixel_values`` (C, H, W), fed to the model as they are.

    The pass-through image processor stacks them; ``size`` is PIL's ``(width, height)``, so
    the evaluation's crop of images larger than the input (never these: they are checked to be
    the input's size) leaves them alone."""

    def __init__(self, values: torch.Tensor):
        self.values = values

    @property
    def size(self) -> tuple[int, int]:
        return int(self.values.shape[-1]), int(self.values.shape[-2])

    def __repr__(self) -> str:
        return f"Pixels{tuple(self.values.shape)}"


class Tokens:
    """One caption's ``input_ids`` (and ``attention_mask``), fed to the model as they are."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor | None = None):
        self.ids = ids
        self.mask = mask if mask is not None else torch.ones_like(ids)

    def __radd__(self, prefix: str) -> "Tokens":
        """A collator's ``prompt + caption``: only the empty prompt applies to tokens."""
        if prefix:
            raise DataError(f"a prompt ({show(prefix)}) cannot be put before captions given as input_ids; give raw "
                            "caption text")
        return self

    def __repr__(self) -> str:
        return f"Tokens({self.ids.tolist()})"


class _Wrapper:
    """Delegates every attribute (``save_pretrained``, ``size``, ...) to the wrapped part."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "inner":  # copy / pickle look these up before __init__
            raise AttributeError(name)
        return getattr(self.inner, name)


class _PassImages(_Wrapper):
    """An image processor that stacks :class:`Pixels` and processes anything else as before."""

    def __call__(self, *args, images=None, **kwargs):
        given = images if images is not None else (args[0] if args else None)
        items = list(given) if isinstance(given, (list, tuple)) else [given]
        kinds = {isinstance(x, Pixels) for x in items}
        if kinds != {True}:
            if True in kinds:
                raise DataError("a batch mixes processed pixel_values with raw images; give one kind per split")
            return self.inner(*args, images=images, **kwargs) if images is not None else self.inner(*args, **kwargs)
        shapes = {tuple(x.values.shape) for x in items}
        if len(shapes) > 1:
            raise DataError(f"pixel_values of one batch have different shapes {show(sorted(shapes))}; upop stacks "
                            "them as they are (process every image to the model's input size)")
        return {"pixel_values": torch.stack([x.values for x in items])}


class _PassTexts(_Wrapper):
    """A tokenizer that pads :class:`Tokens` (right, with its pad id) and tokenizes text as before."""

    def __call__(self, text=None, *args, padding="longest", truncation=False, max_length=None, **kwargs):
        items = list(text) if isinstance(text, (list, tuple)) else [text]
        kinds = {isinstance(x, Tokens) for x in items}
        if kinds != {True}:
            if True in kinds:
                raise DataError("a batch mixes input_ids with caption text; give one kind per split")
            return self.inner(text, *args, padding=padding, truncation=truncation, max_length=max_length, **kwargs)
        longest = max(len(x.ids) for x in items)
        length = max_length if padding == "max_length" and max_length else longest
        if truncation and max_length:
            length = min(length, max_length)
        pad = getattr(self.inner, "pad_token_id", None) or 0
        ids = torch.full((len(items), length), int(pad), dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, x in enumerate(items):
            n = min(len(x.ids), length)
            ids[row, :n], mask[row, :n] = x.ids[:n], x.mask[:n]
        return {"input_ids": ids, "attention_mask": mask}


class _PassProcessor(_Wrapper):
    """A processor whose image processor and tokenizer pass processed inputs through."""

    def __init__(self, inner):
        super().__init__(inner)
        image_processor, tokenizer = getattr(inner, "image_processor", None), getattr(inner, "tokenizer", None)
        self.image_processor = _PassImages(image_processor) if image_processor is not None else None
        self.tokenizer = _PassTexts(tokenizer) if tokenizer is not None else None

    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def _is_tokenizer(part) -> bool:
    return hasattr(part, "pad_token_id") and not hasattr(part, "image_processor")


def pass_through(processor):
    """``processor`` (a processor, an image processor, a tokenizer, an ``(image_processor,
    tokenizer)`` pair or a dict of both) with parts that feed :class:`Pixels` and :class:`Tokens`
    as they are; everything else (saving included) is the processor's own."""
    if isinstance(processor, _Wrapper):
        return processor
    if isinstance(processor, dict):
        return {k: pass_through(v) for k, v in processor.items()}
    if isinstance(processor, (tuple, list)):
        return type(processor)(pass_through(p) for p in processor)
    if hasattr(processor, "image_processor") or hasattr(processor, "tokenizer"):
        return _PassProcessor(processor)
    return _PassTexts(processor) if _is_tokenizer(processor) else _PassImages(processor)


def _image_processor(processor):
    if isinstance(processor, dict):
        return processor.get("image_processor")
    if isinstance(processor, (tuple, list)):
        return processor[0] if processor else None
    return getattr(processor, "image_processor", None) or (None if _is_tokenizer(processor) else processor)


# a user's rows ---------------------------------------------------------------------------------


def _kind(data) -> str:
    return type(data).__name__


def _is_hf(data) -> bool:
    return type(data).__module__.startswith("datasets.") and hasattr(data, "column_names")


def refuse_iterables(split: str, data) -> None:
    """A ``DataLoader``, an iterable data set or any object that is not a data set of rows is one
    line: upop builds its own batches (shards, order, resume) from indexed rows."""
    if isinstance(data, DataLoader):
        raise DataError(f"{split} is a DataLoader; pass its dataset (loader.dataset): upop batches itself")
    if isinstance(data, IterableDataset) or type(data).__name__ == "IterableDataset":
        raise DataError(f"{split} is an {_kind(data)}; upop needs a map-style data set (len() and [i]): a "
                        "datasets.Dataset, a torch Dataset or a list of dicts")
    if isinstance(data, (str, bytes, Mapping)) or not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        raise DataError(f"{split} is a {_kind(data)}; pass a datasets.Dataset, a torch Dataset or a list of dicts "
                        "(upop batches itself)")


class _Rows:
    """A split's rows read through the schema's field names: ``row(i)[ours]``, ``column(ours)``."""

    def __init__(self, split: str, data, names: dict[str, str], trainer: bool = False):
        self.split, self.data, self.names, self.trainer = split, data, names, trainer
        self.hf = _is_hf(data)

    def __len__(self) -> int:
        return len(self.data)

    def raw(self, i: int) -> Mapping:
        row = self.data[i]
        if not isinstance(row, Mapping):
            raise DataError(f"{self.split} row {i} is a {_kind(row)}; upop reads rows as dicts of named fields "
                            "(see docs/data.md)")
        return row

    def value(self, row: Mapping, i: int, ours: str) -> Any:
        theirs = self.names[ours]
        if theirs not in row:
            raise DataError(f"{self.split} row {i} has no field {show(theirs)} (the rows have: "
                            f"{', '.join(map(str, row))})")
        return row[theirs]

    def column(self, ours: str) -> list:
        """Every row's value of ``ours`` (a ``datasets.Dataset`` reads the one column)."""
        if self.has(ours) and self.hf:
            return list(self.data[self.names[ours]])
        return [self.value(self.raw(i), i, ours) for i in range(len(self))] if self.has(ours) else []

    def has(self, ours: str) -> bool:
        return ours in self.names

    def only(self, fields: Sequence[str]) -> "_Rows":
        """These rows with only ``fields`` (those they have): a ``datasets.Dataset`` then reads its
        text columns without decoding its images."""
        names = {k: v for k, v in self.names.items() if k in fields}
        data = self.data.select_columns(list(dict.fromkeys(names.values()))) if self.hf else self.data
        return _Rows(self.split, data, names, self.trainer)

    def digest(self) -> tuple:
        """What the run's fingerprint reads of these rows (``datasets``: its own fingerprint)."""
        return ("rows", len(self), tuple(sorted(self.names.items())), getattr(self.data, "_fingerprint", None))


def _field_names(split: str, data) -> list[str]:
    if _is_hf(data):
        return list(data.column_names)
    if len(data) == 0:
        raise DataError(f"{split} has no rows (need at least one)")
    first = data[0]
    if not isinstance(first, Mapping):
        raise DataError(f"{split} row 0 is a {_kind(first)}; upop reads rows as dicts of named fields (see "
                        "docs/data.md)")
    return [str(k) for k in first]


def _resolve(split: str, schema: RowSchema, task: str, have: list[str], columns: Mapping[str, str]) -> tuple[dict, bool]:
    """``({ours: theirs}, trainer)``: the rows' name of each field (a field given as its parts:
    each part's), and whether they are Trainer-style; a missing field is one line naming what the
    rows have and what is accepted."""
    have_list = ", ".join(have) or "none"

    def find(ours: str) -> str | None:
        if ours in columns:
            if columns[ours] not in have:
                raise DataError(f"columns maps {show(ours)} to {show(columns[ours])}, which {split} lacks (the rows "
                                f"have: {have_list})")
            return columns[ours]
        return next((n for n in (ours, *schema.aliases.get(ours, ())) if n in have), None)

    def find_raw(ours: str) -> dict | None:
        name = find(ours)
        if name is not None:
            return {ours: name}
        parts = {p: find(p) for p in schema.parts.get(ours, ())}
        return parts if parts and all(parts.values()) else None

    raw = {f: find_raw(f) for f in (*schema.required, *schema.any_of, *schema.optional)}
    missing = [f for f in schema.required if raw[f] is None]
    if schema.any_of and all(raw[f] is None for f in schema.any_of):
        missing.append(schema.any_of)
    if not missing:
        return {k: v for found in raw.values() if found for k, v in found.items()}, False
    trainer = {f: find(f) for f in (*schema.trainer, *schema.trainer_any_of, *schema.trainer_optional,
                                    *(f for f in ("index",) if f in schema.optional))}
    if (schema.takes_trainer and all(trainer[f] is not None for f in schema.trainer)
            and (not schema.trainer_any_of or any(trainer[f] is not None for f in schema.trainer_any_of))):
        return {k: v for k, v in trainer.items() if v is not None}, True
    given = [n for n in have if n in TRAINER_FIELDS]
    if given and not schema.takes_trainer:
        raise DataError(f"{split} has Trainer-style fields ({', '.join(given)}) but task {task!r} cannot take "
                        f"processed tensors ({schema.raw_only}): give rows with {schema.wants()}")
    first = missing[0]
    if isinstance(first, tuple):  # none of the any_of fields
        what, accepted, example = (f"none of the fields {', '.join(map(show, first))}",
                                   "; ".join(schema.accepted(f) for f in first), first[0])
    else:
        what, accepted, example = f"no field {show(first)}", schema.accepted(first), first
    alt = f"; or Trainer-style {schema.trainer_wants()}" if schema.takes_trainer else ""
    raise DataError(f"{split} rows have {what} (the rows have: {have_list}; accepted names: {accepted}{alt}; map "
                    f"another with columns={{{example!r}: NAME}})")


# values ------------------------------------------------------------------------------------------


def _tensor(split: str, i: int, name: str, value, dtype) -> torch.Tensor:
    try:
        return torch.as_tensor(np.asarray(value), dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{split} row {i} field {show(name)} is not a numeric array ({show(str(exc))})") from None


def _as_image(rows: _Rows, i: int, name: str, value) -> Any:
    """A PIL image (RGB) or an image file path as the RGB image the task reads."""
    if isinstance(value, Image.Image):
        return value if value.mode == "RGB" else value.convert("RGB")
    if isinstance(value, (str, Path)):
        return load_rgb_image(value)
    raise DataError(f"{rows.split} row {i} field {show(name)} is a {_kind(value)}; need a PIL image or an image "
                    "file path (or Trainer-style pixel_values where the task takes them)")


def _image(rows: _Rows, row: Mapping, i: int) -> Any:
    return _as_image(rows, i, rows.names["image"], rows.value(row, i, "image"))


def _image_pair(rows: _Rows, row: Mapping, i: int, ours: str, parts: Sequence[str]) -> tuple:
    """Field ``ours`` of the row: two images, as one field (a list of two) or as its ``parts``."""
    if not rows.has(ours):
        return tuple(_as_image(rows, i, rows.names[p], rows.value(row, i, p)) for p in parts)
    value = rows.value(row, i, ours)
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise DataError(f"{rows.split} row {i} field {show(rows.names[ours])} is {show(value, 60)}; need a pair of "
                        f"images (a list of two, or the fields {' + '.join(parts)})")
    return tuple(_as_image(rows, i, rows.names[ours], v) for v in value)


def _mask(rows: _Rows, row: Mapping, i: int, image) -> Image.Image:
    """The row's segmentation mask as an ``L`` image of class ids (255 = ignore), the size of
    ``image``: a single-channel PIL image, an integer array or a file path (read as stored
    integers, :func:`~upop.data.images.load_label_map`)."""
    name, value = rows.names["mask"], rows.value(row, i, "mask")
    where = f"{rows.split} row {i} field {show(name)}"
    if isinstance(value, (str, Path)):
        values = load_label_map(value, "mask")
    elif isinstance(value, Image.Image):
        if value.mode not in LABEL_MODES:
            raise DataError(f"{where} is a {value.mode} image; need a single-channel map of class ids "
                            f"({', '.join(LABEL_MODES)})")
        values = np.asarray(value)
    else:
        try:
            values = np.asarray(value)
        except (TypeError, ValueError):
            values = np.asarray(None)
        if values.dtype == object or not (np.issubdtype(values.dtype, np.integer) or values.dtype == bool):
            what = f"an array of {values.dtype}" if values.dtype != object else f"a {_kind(value)}"
            raise DataError(f"{where} is {what}; need a mask of class ids: an integer array, a single-channel PIL "
                            "image or a file path")
    if values.ndim != 2:
        raise DataError(f"{where} has shape {values.shape}; need one (height, width) map of class ids")
    if values.size and (int(values.min()) < 0 or int(values.max()) > IGNORE_INDEX):
        bad = int(values.min()) if int(values.min()) < 0 else int(values.max())
        raise DataError(f"{where} has value {bad}; need the model's class ids (0 and up) with {IGNORE_INDEX} for "
                        "pixels to ignore")
    if values.shape != (image.size[1], image.size[0]):
        raise DataError(f"{where} is {values.shape[1]}x{values.shape[0]} but its image is "
                        f"{image.size[0]}x{image.size[1]} (need the same size)")
    return Image.fromarray(values.astype(np.uint8))


def _truth(rows: _Rows, row: Mapping, i: int, ours: str) -> int:
    """A true/false label as 1/0: a bool, ``"True"``/``"False"`` (any case) or the integer 0 or 1."""
    value = rows.value(row, i, ours)
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return int(value.strip().lower() == "true")
    if isinstance(value, (int, np.integer)) and int(value) in (0, 1):
        return int(value)
    raise DataError(f"{rows.split} row {i} field {show(rows.names[ours])} is {show(value, 40)}; need True or False "
                    "(a bool, 'True'/'False' or 0/1)")


def _text(rows: _Rows, row: Mapping, i: int, ours: str) -> str:
    """A non-empty text, white space runs collapsed."""
    value = rows.value(row, i, ours)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{rows.split} row {i} field {show(rows.names[ours])} is {show(value, 60)}; need a non-empty "
                        "text")
    return " ".join(value.split())


def _answers(rows: _Rows, row: Mapping, i: int, ours: str) -> list[str]:
    """The annotators' answers, kept verbatim: one text, a list of texts, or VQAv2's list of
    ``{"answer": text, ...}``."""
    value = rows.value(row, i, ours)
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else []
    answers = [a.get("answer") if isinstance(a, Mapping) else a for a in items]
    if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise DataError(f"{rows.split} row {i} field {show(rows.names[ours])} is {show(value, 60)}; need an answer "
                        "(non-empty text), a list of them or a list of {'answer': text}")
    return answers


def _pixels(rows: _Rows, row: Mapping, i: int) -> Pixels:
    values = _tensor(rows.split, i, rows.names["pixel_values"], rows.value(row, i, "pixel_values"), torch.float32)
    if values.dim() != 3:
        raise DataError(f"{rows.split} row {i} pixel_values have shape {tuple(values.shape)}; need (channels, height, "
                        "width) of one image")
    return Pixels(values)


def _int(rows: _Rows, row: Mapping, i: int, ours: str) -> int:
    value = rows.value(row, i, ours)
    try:
        if isinstance(value, (bool, str, float)) or np.ndim(value) != 0:
            raise TypeError
        return int(value)
    except (TypeError, ValueError):
        raise DataError(f"{rows.split} row {i} field {show(rows.names[ours])} is {show(value, 60)}; need an integer "
                        "id") from None


def _tokens(rows: _Rows, row: Mapping, i: int) -> Tokens:
    """The row's Trainer-style ``input_ids`` (and ``attention_mask``)."""
    ids = _tensor(rows.split, i, rows.names["input_ids"], rows.value(row, i, "input_ids"), torch.long)
    mask = (_tensor(rows.split, i, rows.names["attention_mask"], rows.value(row, i, "attention_mask"), torch.long)
            if rows.has("attention_mask") else None)
    if ids.dim() != 1 or (mask is not None and mask.shape != ids.shape):
        raise DataError(f"{rows.split} row {i} input_ids have shape {tuple(ids.shape)}; need one text's token ids "
                        "(and an attention_mask of the same length)")
    return Tokens(ids, mask)


def _captions(rows: _Rows, row: Mapping, i: int) -> list:
    """The row's captions: text (one string or a list of them) or its Trainer-style input_ids."""
    if rows.has("input_ids"):
        return [_tokens(rows, row, i)]
    value = rows.value(row, i, "caption")
    texts = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise DataError(f"{rows.split} row {i} field {show(rows.names['caption'])} is {show(value, 60)}; need a "
                        "caption (non-empty text) or a list of them")
    return [" ".join(t.split()) for t in texts]


def _sample(rows: _Rows, i: int, fields: Sequence[str]) -> dict:
    """Row ``i`` with the task's field names: image (PIL or :class:`Pixels`), label (a class id,
    or a mask's map of class ids), index."""
    row = rows.raw(i)
    out: dict[str, Any] = {}
    if "image" in fields:
        out["image"] = _pixels(rows, row, i) if rows.has("pixel_values") else _image(rows, row, i)
    if "label" in fields:
        out["label"] = _int(rows, row, i, "labels" if rows.has("labels") else "label")
    if "mask" in fields:  # the task's "label": a map of class ids
        out["label"] = _mask(rows, row, i, out["image"])
    out["index"] = _int(rows, row, i, "index") if rows.has("index") else int(i)
    return out


# layouts: how rows become the task's data set -------------------------------------------------


class RowsDataset(Dataset):
    """``ds[i] == {"image", "label", "index"}`` (the fields the schema names) of a user's rows."""

    def __init__(self, rows: _Rows, schema: RowSchema):
        self.rows, self.fields, self.split = rows, (*schema.required, *schema.optional), rows.split

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return _sample(self.rows, int(i), self.fields)

    @property
    def items(self) -> tuple:
        return self.rows.digest()


@dataclass
class UserImage:
    """One image of a user's image-text rows: the row it is read from and all its captions."""

    row: int
    captions: list


class _ImageTexts(Dataset):
    """Image-text rows grouped by image: rows with the same ``index`` show the same image (the
    first such row's image is read); without ``index`` every row is an image."""

    def __init__(self, rows: _Rows):
        self.rows, self.split = rows, rows.split
        keys = rows.column("index") if rows.has("index") else range(len(rows))
        groups: dict[Any, UserImage] = {}
        for i, key in enumerate(keys):
            key = key.item() if hasattr(key, "item") else key
            captions = _captions(rows, rows.raw(i), i) if not rows.hf else None
            if key not in groups:
                groups[key] = UserImage(row=i, captions=[])
            groups[key].captions.extend(captions if captions is not None else self._column_captions(i))
        self.items = list(groups.values())

    def _column_captions(self, i: int) -> list:
        if not hasattr(self, "_texts"):  # a datasets.Dataset reads its text columns once, not its images
            names = [self.rows.names[n] for n in ("input_ids", "attention_mask", "caption") if self.rows.has(n)]
            texts = self.rows.data.select_columns(names)
            self._texts = _Rows(self.split, texts, {k: v for k, v in self.rows.names.items() if v in names})
        return _captions(self._texts, self._texts.raw(i), i)

    def image(self, i: int) -> Any:
        item = self.items[i]
        row = self.rows.raw(item.row)
        return _pixels(self.rows, row, item.row) if self.rows.has("pixel_values") else _image(self.rows, row, item.row)


class ImageTextsDataset(_ImageTexts):
    """Evaluation view: ``ds[i] == {"image", "captions", "index": i}``, one sample per image
    (what :class:`~upop.data.retrieval.RetrievalDataset` yields)."""

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.image(int(i)), "captions": list(self.items[i].captions), "index": int(i)}

    def flat_captions(self) -> tuple[list, list[int], list[list[int]]]:
        """``(texts, txt2img, img2txt)`` of every caption, as the retrieval reader's."""
        return flat_captions(self.items)


class ImageTextPairs(_ImageTexts):
    """Training view: one sample per (image, caption) pair, ``{"image", "caption", "index": image
    position, "sample": j}`` (what :class:`~upop.data.retrieval.RetrievalPairs` yields)."""

    def __init__(self, rows: _Rows):
        super().__init__(rows)
        self.pairs = [(i, c) for i, item in enumerate(self.items) for c in range(len(item.captions))]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, j: int) -> dict:
        i, c = self.pairs[j]
        return {"image": self.image(i), "caption": self.items[i].captions[c], "index": i, "sample": int(j)}


@dataclass
class UserQuestion:
    """One question of a user's rows: the row its image is read from, and the annotators' answers
    (what :class:`~upop.data.vqa.VQAItem` holds)."""

    row: int
    question_id: str
    question: str
    answers: list


class QuestionsDataset(Dataset):
    """``ds[i] == {"image", "question", "answers", "index": i}``, one sample per row (what
    :class:`~upop.data.vqa.VQADataset` yields); ``candidates``: the answers rank inference chooses
    from, set by the task's ``finish`` (else None)."""

    def __init__(self, rows: _Rows):
        self.rows, self.split, self.candidates = rows, rows.split, None
        texts = rows.only(("question", "answers", "question_id"))
        self.items = []
        for i in range(len(texts)):
            row = texts.raw(i)
            qid = str(texts.value(row, i, "question_id")) if texts.has("question_id") else str(i)
            self.items.append(UserQuestion(i, qid, _text(texts, row, i, "question"),
                                           _answers(texts, row, i, "answers")))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = self.items[int(i)]
        return {"image": _image(self.rows, self.rows.raw(item.row), item.row), "question": item.question,
                "answers": list(item.answers), "index": int(i)}


@dataclass
class UserStatement:
    """One statement of a user's rows about the row's two images, and whether it is true (1)."""

    row: int
    sentence: str
    label: int


class ImagePairsDataset(Dataset):
    """``ds[i] == {"images": (PIL, PIL), "sentence", "label": 0 | 1, "index": i}``, one sample per
    row (what :class:`~upop.data.nlvr.NLVRDataset` yields); the pair is the field ``images`` or
    its parts (``RowSchema.parts``)."""

    def __init__(self, rows: _Rows, schema: RowSchema):
        self.rows, self.split, self.parts = rows, rows.split, tuple(schema.parts.get("images", ()))
        texts = rows.only(("sentence", "label"))
        self.items = []
        for i in range(len(texts)):
            row = texts.raw(i)
            self.items.append(UserStatement(i, _text(texts, row, i, "sentence"), _truth(texts, row, i, "label")))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = self.items[int(i)]
        images = _image_pair(self.rows, self.rows.raw(item.row), item.row, "images", self.parts)
        return {"images": images, "sentence": item.sentence, "label": item.label, "index": int(i)}


class UnlabelledRows(UnlabelledDataset):
    """Images and/or sentences of a user's rows, as the unlabelled reader's split
    (:class:`~upop.data.unlabelled.UnlabelledDataset`: ``use``, ``images``, ``texts``, ``image(j)``):
    every row of a split with an image field is an image, every row with a text field a sentence
    (Trainer-style: ``pixel_values`` and ``input_ids``). ``index`` is the position in the split."""

    def __init__(self, rows: _Rows, schema: RowSchema):
        self.rows, self.schema = rows, schema
        images = list(range(len(rows))) if rows.has("image") or rows.has("pixel_values") else []
        sentences = []
        if rows.has("text") or rows.has("input_ids"):
            texts = rows.only(("text", "input_ids", "attention_mask"))
            read = _tokens if texts.has("input_ids") else lambda r, row, i: _text(r, row, i, "text")
            sentences = [read(texts, texts.raw(i), i) for i in range(len(texts))]
        super().__init__(images, sentences, rows.split)

    def image(self, j: int):
        row = self.images[j]
        raw = self.rows.raw(row)
        return _pixels(self.rows, raw, row) if self.rows.has("pixel_values") else _image(self.rows, raw, row)

    def use(self, images: bool, texts: bool, who: str = "the model") -> None:
        for part, needed, ours, processed in (("images", images, "image", "pixel_values"),
                                              ("texts", texts, "text", "input_ids")):
            if needed and not getattr(self, part):
                alt = f"; or Trainer-style {processed}" if processed in self.schema.fields() else ""
                raise DataError(f"{who} needs {part} but the {self.split} rows have no {ours} field (accepted names: "
                                f"{self.schema.accepted(ours)}{alt})")
        super().use(images, texts, who)

    @property
    def items(self) -> list:
        return [self.rows.digest(), *map(repr, self.texts)]


#: the data set each layout builds from a split's rows: ``(rows, schema, is_train) -> Dataset``
LAYOUTS: dict[str, Callable[[_Rows, RowSchema, bool], Dataset]] = {
    "rows": lambda rows, schema, train: RowsDataset(rows, schema),
    "image_captions": lambda rows, schema, train: ImageTextPairs(rows) if train else ImageTextsDataset(rows),
    "questions": lambda rows, schema, train: QuestionsDataset(rows),
    "image_pairs": lambda rows, schema, train: ImagePairsDataset(rows, schema),
    "unlabelled": lambda rows, schema, train: UnlabelledRows(rows, schema),
}


# the entry point -------------------------------------------------------------------------------


def _check_columns(task: str, schema: RowSchema, columns: Mapping[str, str]) -> None:
    if not isinstance(columns, Mapping):
        raise DataError(f"columns={show(columns)} is not allowed; need a dict {{field: the rows' name}}")
    for ours, theirs in columns.items():
        if ours not in schema.fields():
            raise DataError(f"columns names {show(ours)}, which is not a field of task {task!r} (its fields: "
                            f"{', '.join(dict.fromkeys(schema.fields()))})")
        if not isinstance(theirs, str) or not theirs:
            raise DataError(f"columns[{ours!r}] = {show(theirs)} is not allowed; need the rows' field name")


def _check_pixels(split: str, dataset: Dataset, processor) -> None:
    """Trainer-style pixel_values must be what the processor would make: its input size, and no
    other image input (a NaFlex processor's patch grid)."""
    image_processor = _image_processor(processor)
    sample = dataset[0].get("image") if image_processor is not None else None
    if not isinstance(sample, Pixels):  # no image processor, or rows of token ids only
        return
    extra = [n for n in (getattr(image_processor, "model_input_names", None) or ()) if n != "pixel_values"]
    if extra:
        raise DataError(f"{split} has Trainer-style pixel_values but the processor's images also need "
                        f"{', '.join(extra)}; give raw images (field 'image')")
    try:
        size = input_size(image_processor)
    except ValueError:
        return
    if tuple(sample.values.shape[-2:]) != tuple(size):
        raise DataError(f"{split} pixel_values are {tuple(sample.values.shape)} but the processor makes "
                        f"{size[0]}x{size[1]} images; process them to the model's input size")


def adapt_split(task, split: str, data, processor, columns: Mapping[str, str] | None = None) -> tuple[Any, bool]:
    """``(dataset, trainer)``: split ``data`` as ``task`` reads it, and whether its rows are
    Trainer-style (their processed tensors then need :func:`pass_through` on the processor)."""
    refuse_iterables(split, data)
    schema: RowSchema | None = task.row_schema
    if type(data).__module__.startswith("upop."):  # upop's own readers and adapted splits
        rows = getattr(data, "rows", None)
        return data, isinstance(rows, _Rows) and rows.trainer
    if schema is None:
        if isinstance(data, Dataset):
            return data, False
        raise DataError(f"{split} is a {_kind(data)}; task {task.name!r} reads rows from Python only as a torch "
                        "Dataset of its reader's samples (or give data=FOLDER)")
    columns = columns or {}
    _check_columns(task.name, schema, columns)
    names, trainer = _resolve(split, schema, task.name, _field_names(split, data), columns)
    if trainer:
        for setting, needed in schema.trainer_needs.items():
            if getattr(task, setting, needed) != needed:
                raise DataError(f"{split} has Trainer-style rows ({schema.trainer_wants()}), which task "
                                f"{task.name!r} takes only with {setting}={needed!r} (now "
                                f"{getattr(task, setting)!r}); set {setting}={needed!r} or give raw rows "
                                f"({schema.wants()})")
    if len(data) == 0:
        raise DataError(f"{split} has no rows (need at least one)")
    return LAYOUTS[schema.layout](_Rows(split, data, names, trainer), schema, split == "train"), trainer


def adapt_splits(task, splits: Mapping[str, Any], processor, columns: Mapping[str, str] | None = None):
    """``(splits, processor)``: every given split (None stays None) as ``task`` reads it, and the
    processor, wrapped by :func:`pass_through` when a split is Trainer-style."""
    out, trainer = {}, False
    for split, data in splits.items():
        if data is None:
            out[split] = None
            continue
        out[split], processed = adapt_split(task, split, data, processor, columns)
        if processed:
            _check_pixels(split, out[split], processor)
        trainer = trainer or processed
    finish = task.row_schema.finish if task.row_schema is not None else None
    if finish is not None:
        finish(task, out)
    return out, (pass_through(processor) if trainer and processor is not None else processor)


__all__ = ["ImagePairsDataset", "ImageTextPairs", "ImageTextsDataset", "LAYOUTS", "Pixels", "QuestionsDataset",
           "RowSchema", "RowsDataset", "TRAINER_FIELDS", "Tokens", "UnlabelledRows", "UserQuestion", "UserStatement",
           "adapt_split", "adapt_splits", "pass_through", "refuse_iterables"]
