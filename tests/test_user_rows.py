"""Users' data as they have it (``upop.compress(train=..., val=...)``, :mod:`upop.data.user_rows`):
table-driven over the tasks, each of which declares a ``row_schema``."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import upop
from upop.data import shapes_min_split, shapes_writer
from upop.data.unlabelled import processor_parts
from upop.data.user_rows import LAYOUTS, RowSchema, adapt_splits
from upop.errors import DataError
from upop.tasks import get_task, task_names

DOC = Path(__file__).resolve().parent.parent / "docs" / "data.md"
#: the tasks that read rows from Python, and those of them that take Trainer-style rows
TASKS = task_names()
SCHEMA_TASKS = [name for name in TASKS if get_task(name).row_schema is not None]
TRAINER_TASKS = [name for name in SCHEMA_TASKS if get_task(name).row_schema.takes_trainer]
SIZE, ROWS = 32, 8
COLOURS = ("red", "blue")


def _family(task: str) -> str:
    """The smallest tiny model the registry declares for ``task`` (the cheapest run)."""
    from upop.arch import pairs
    from upop.models.folders import make_model

    tinies = [tiny for tiny, served in pairs() if served == task]
    return min(tinies, key=lambda tiny: sum(p.numel() for p in make_model(tiny).parameters()))


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(n)]


def _values(n: int) -> dict[str, list]:
    """``n`` values of every raw field a schema may name, as a user has them."""
    colours = [COLOURS[i % 2] for i in range(n)]
    masks = [np.full((SIZE, SIZE), i % 2, dtype=np.uint8) for i in range(n)]
    for mask in masks:
        mask[:4] = 255  # ignored pixels
    images, others = _images(n), _images(n, seed=1)
    return {"image": images, "label": [i % 2 for i in range(n)], "caption": [f"a {c} circle" for c in colours],
            "question": ["what colour is the circle"] * n, "answers": [[c, c, "dark " + c] for c in colours],
            "images": [(a, b) for a, b in zip(images, others)], "image0": images, "image1": others,
            "sentence": [f"the left image shows a {c} circle" for c in colours], "mask": masks,
            "text": [f"a {c} circle" for c in colours]}


def _needed(schema: RowSchema) -> list[tuple[str, ...]]:
    """The schema's needs: each required field, then the group of which one is needed."""
    return [(f,) for f in schema.required] + ([schema.any_of] if schema.any_of else [])


def _names(schema: RowSchema, field: str) -> tuple[str, ...]:
    """Every name the rows may give ``field`` (or its parts) under."""
    parts = schema.parts.get(field, ())
    return (field, *schema.aliases.get(field, ()), *parts, *(a for p in parts for a in schema.aliases.get(p, ())))


def _raw_rows(task: str, n: int = ROWS) -> list[dict]:
    """Rows with the schema's needed fields, as a user has them: the first alias where there is
    one, a field with parts given as its parts."""
    schema = get_task(task).row_schema
    values = _values(n)
    fields = [p for group in _needed(schema) for f in group for p in (schema.parts.get(f) or (f,))]
    return [{(schema.aliases.get(f) or (f,))[0]: values[f][i] for f in fields} for i in range(n)]


def _trainer_columns(task: str, processor, n: int = ROWS) -> dict[str, list]:
    """Trainer-style columns of ``task`` made by ``processor`` (pixel_values, labels, input_ids...),
    those the processor can make."""
    schema = get_task(task).row_schema
    image_processor, tokenizer = processor_parts(processor)
    cols = {"labels": [i % 2 for i in range(n)]}
    if image_processor is not None:
        pixels = image_processor(images=_images(n), return_tensors="pt")["pixel_values"]
        cols["pixel_values"] = [x.numpy() for x in pixels]
    if tokenizer is not None:
        enc = tokenizer([f"a {COLOURS[i % 2]} circle" for i in range(n)])
        cols["input_ids"], cols["attention_mask"] = enc["input_ids"], enc["attention_mask"]
    return {k: v for k, v in cols.items() if k in schema.fields()}


def _setup(task: str):
    from upop.models.folders import make_processor, make_model

    family = _family(task)
    processor = make_processor(family, SIZE)
    tokenizer = processor_parts(processor)[1]
    vocab = {"vocab_size": len(tokenizer)} if tokenizer is not None else {}
    model = make_model(family, image_size=SIZE, num_labels=2, **vocab)
    return model, processor


def _one_line(fn, *needles):
    with pytest.raises(DataError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


@pytest.mark.parametrize("task", TASKS)
def test_every_task_declares_its_rows(task):
    """A registered task (one registered later too) says which rows it reads from Python, with a
    layout user_rows knows, and why it takes no Trainer-style rows where it takes none."""
    schema = get_task(task).row_schema
    assert isinstance(schema, RowSchema)
    assert schema.layout in LAYOUTS
    assert schema.required or schema.any_of
    assert schema.takes_trainer or schema.raw_only.strip()
    assert set(schema.aliases) <= set(schema.fields())


def test_doc_table_is_the_declared_schemas():
    text = DOC.read_text()
    section = text.split("## Your own data from Python", 1)[1]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 5 and cells[0] in TASKS:
            rows[cells[0]] = tuple(cells[1:])
    assert rows == {t: get_task(t).row_schema.doc_cells() for t in SCHEMA_TASKS}


@pytest.mark.parametrize("task", SCHEMA_TASKS)
def test_raw_rows_without_index(task):
    """A list of dicts with the aliases' names and no index: every row is read, index is its position."""
    model, processor = _setup(task)
    t = get_task(task)
    splits, same = adapt_splits(t, {"train": _raw_rows(task), "val": _raw_rows(task)}, processor)
    assert same is processor  # raw rows: the processor is the user's
    t.check_model(model)
    t.check_data(model, splits["train"])
    batch = t.collator(processor)([splits["train"][i] for i in range(len(splits["train"]))])
    assert next(batch[k] for k in ("pixel_values", "input_ids") if k in batch).shape[0] == ROWS
    if "index" in batch:
        assert batch["index"].tolist() == list(range(ROWS))


def _kinds(sample: dict) -> dict:
    """The keys of a sample and the kind of each value (images as images, sequences item-wise)."""
    def kind(value):
        if isinstance(value, Image.Image):
            return "image"
        if isinstance(value, (list, tuple)):
            return tuple(sorted({kind(v) for v in value}))
        return type(value).__name__

    return {k: kind(v) for k, v in sample.items()}


@pytest.mark.parametrize("task", SCHEMA_TASKS)
def test_rows_yield_what_the_tasks_reader_yields(task, tmp_path):
    """A sample of adapted rows has the keys and kinds of values of a sample of the task's own
    reader (its Shapes data set), which the task's collator and evaluation are written for."""
    n = shapes_min_split(task)
    shapes_writer(task)(tmp_path, train=n, val=n, test=n, image_size=SIZE, seed=0)
    t = get_task(task)
    reader = t.load_splits(tmp_path, splits=("val",))["val"]
    splits, _ = adapt_splits(t, {"train": _raw_rows(task), "val": _raw_rows(task)}, None)
    assert _kinds(splits["val"][0]) == _kinds(reader[0])


@pytest.mark.parametrize("task, kind", [pytest.param(task, kind, marks=[pytest.mark.slow] if kind == "datasets"
                                                      and task != SCHEMA_TASKS[0] else [])
                                         for task in SCHEMA_TASKS for kind in ("list", "datasets")])
def test_compress_from_raw_rows(task, kind, tmp_path):
    """``upop.compress`` runs end to end from raw rows: a list of dicts or a ``datasets.Dataset`` (every
    task from a list; the first task also from a Dataset in the default suite, the others in CI's second
    stage: a Dataset is adapted the same way for every task, by its row schema)."""
    model, processor = _setup(task)
    rows = _raw_rows(task)
    if kind == "datasets":
        rows = pytest.importorskip("datasets").Dataset.from_list(rows)
    config = upop.UPopConfig(search_epochs=1, retrain_epochs=1, batch_size=4, latency_time=0.02, distill="none",
                             caption_beams=1)  # greedy captions: the rows are under test, not the decoding
    result = upop.compress(model, task, train=rows, val=rows, processor=processor, config=config,
                           out_dir=tmp_path / "out", progress=False, log=lambda _: None)
    metrics = result.report["compressed"]["metrics"]
    assert metrics and all(math.isfinite(v) for v in metrics.values())
    assert (tmp_path / "out" / "compressed" / "config.json").is_file()


@pytest.mark.parametrize("task", TRAINER_TASKS)
def test_trainer_rows_are_fed_as_they_are(task):
    """The task's own collator returns the user's pixel_values and token ids unchanged."""
    model, processor = _setup(task)
    t = get_task(task)
    t.augment = "none"
    cols = _trainer_columns(task, processor)
    rows = [{k: v[i] for k, v in cols.items()} for i in range(ROWS)]
    splits, wrapped = adapt_splits(t, {"train": rows, "val": rows}, processor)
    t.check_model(model)
    t.check_data(model, splits["train"])
    batch = t.collator(wrapped)([splits["train"][i] for i in range(ROWS)])
    assert {"pixel_values", "input_ids"} & set(cols)
    if "pixel_values" in cols:
        assert torch.equal(batch["pixel_values"], torch.as_tensor(np.stack(cols["pixel_values"])))
    if "input_ids" in cols:
        assert batch["input_ids"].tolist() == cols["input_ids"]


@pytest.mark.parametrize("task", TRAINER_TASKS)
def test_compress_from_a_datasets_dataset(task, tmp_path):
    """``upop.compress`` runs end to end from a ``datasets.Dataset`` with Trainer-style columns."""
    datasets = pytest.importorskip("datasets")
    model, processor = _setup(task)
    data = datasets.Dataset.from_dict(_trainer_columns(task, processor))
    config = upop.UPopConfig(search_epochs=1, retrain_epochs=1, batch_size=4, latency_time=0.02,
                             augment="none", distill="none")
    result = upop.compress(model, task, train=data, val=data, processor=processor, config=config,
                           out_dir=tmp_path / "out", progress=False, log=lambda _: None)
    metrics = result.report["compressed"]["metrics"]
    assert metrics and all(math.isfinite(v) for v in metrics.values())
    assert (tmp_path / "out" / "compressed" / "config.json").is_file()


@pytest.mark.parametrize("task", SCHEMA_TASKS)
def test_a_missing_field_names_split_field_and_accepted_names(task):
    t, schema = get_task(task), get_task(task).row_schema
    for group in _needed(schema):
        names = {n for f in group for n in _names(schema, f)}
        rows = [{k: v for k, v in row.items() if k not in names} for row in _raw_rows(task)]
        rows = [row or {"unrelated": 1} for row in rows]
        _one_line(lambda: adapt_splits(t, {"train": rows[:1] * 2, "val": _raw_rows(task)}, None),
                  "train", *map(repr, group), *names, *rows[0])


@pytest.mark.parametrize("task", SCHEMA_TASKS)
def test_a_dataloader_is_refused_before_anything_is_written(task, tmp_path):
    model, processor = _setup(task)
    loader = DataLoader(_raw_rows(task), batch_size=2)
    out = tmp_path / "out"
    _one_line(lambda: upop.compress(model, task, train=loader, val=_raw_rows(task), processor=processor,
                                    out_dir=out, progress=False),
              "train is a DataLoader; pass its dataset (loader.dataset): upop batches itself")
    assert not out.exists()


@pytest.mark.parametrize("task", SCHEMA_TASKS)
def test_an_unknown_column_is_one_line(task):
    t = get_task(task)
    _one_line(lambda: adapt_splits(t, {"train": _raw_rows(task), "val": _raw_rows(task)}, None,
                                   columns={"nonsense": "image"}), "'nonsense'", *t.row_schema.required,
              *t.row_schema.any_of)


@pytest.mark.parametrize("task", SCHEMA_TASKS)
def test_columns_map_other_names(task):
    t, schema = get_task(task), get_task(task).row_schema
    field = _needed(schema)[-1][-1]
    theirs = next(k for k in _raw_rows(task)[0] if k in (field, *schema.aliases.get(field, ())))
    rows = [{("their_" + k if k == theirs else k): v for k, v in row.items()} for row in _raw_rows(task)]
    splits, _ = adapt_splits(t, {"train": rows, "val": rows}, None, columns={field: "their_" + theirs})
    assert len(splits["val"]) >= 1
    _one_line(lambda: adapt_splits(t, {"train": rows, "val": rows}, None, columns={field: "absent"}),
              "'absent'", "train", "their_")


@pytest.mark.parametrize("task", [t for t in SCHEMA_TASKS if get_task(t).row_schema.parts])
def test_a_field_or_its_parts(task):
    """A field with parts (a pair of images) reads the same from one field as from its parts."""
    t, schema = get_task(task), get_task(task).row_schema
    values = _values(ROWS)
    for field, parts in schema.parts.items():
        whole = [{k: v for k, v in row.items() if k not in _names(schema, field)} | {field: values[field][i]}
                 for i, row in enumerate(_raw_rows(task))]
        by_parts, _ = adapt_splits(t, {"train": _raw_rows(task), "val": _raw_rows(task)}, None)
        by_field, _ = adapt_splits(t, {"train": whole, "val": whole}, None)
        a, b = by_parts["val"][1][field], by_field["val"][1][field]
        assert len(a) == len(b) == len(parts)
        assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
        three = [row | {field: tuple(values[field][i]) * 2} for i, row in enumerate(whole)]
        _one_line(lambda: adapt_splits(t, {"train": three, "val": three}, None)[0]["train"][0],
                  "train row 0", repr(field), " + ".join(parts))


@pytest.mark.parametrize("task", [t for t in SCHEMA_TASKS if "mask" in get_task(t).row_schema.required])
def test_masks_are_class_id_maps_of_the_image_size(task, tmp_path):
    t, schema = get_task(task), get_task(task).row_schema
    key = (schema.aliases.get("mask") or ("mask",))[0]
    rows = _raw_rows(task)
    path = tmp_path / "mask.png"
    Image.fromarray(np.asarray(rows[1][key])).save(path)
    as_path = [row | {key: path} for row in rows]
    splits, _ = adapt_splits(t, {"train": as_path, "val": as_path}, None)
    label = np.asarray(splits["val"][0]["label"])
    assert np.array_equal(label, np.asarray(rows[1][key])) and label.max() == 255
    for bad, needle in ((np.zeros((SIZE, SIZE + 1), np.uint8), f"{SIZE + 1}x{SIZE}"),
                        (np.full((SIZE, SIZE), 300), "value 300"),
                        (Image.new("RGB", (SIZE, SIZE)), "RGB image"),
                        (np.zeros((SIZE, SIZE), np.float32), "class ids")):
        broken = [row | {key: bad} for row in rows]
        _one_line(lambda: adapt_splits(t, {"train": broken, "val": broken}, None)[0]["train"][0],
                  "train row 0", repr(key), needle)


def test_vqa_candidates_come_from_the_training_rows():
    """Rank inference chooses among the training rows' answers, most frequent first, in every
    split; VQAv2's list of {"answer": ...} is read; an answer_list setting is left to the task."""
    t = get_task("vqa")
    train = _raw_rows("vqa")
    val = [row | {"answer": [{"answer": "green", "answer_confidence": "yes"}]} for row in train[:2]]
    splits, _ = adapt_splits(t, {"train": train, "val": val, "test": None}, None)
    assert splits["val"].candidates == splits["train"].candidates == ["blue", "red", "dark blue", "dark red"]
    assert splits["val"][0]["answers"] == ["green"] and splits["test"] is None
    t.answer_list = "answers.json"
    assert adapt_splits(t, {"train": train, "val": val}, None)[0]["val"].candidates is None


@pytest.mark.parametrize("label,expected", [(True, 1), ("False", 0), (" true ", 1), (np.int64(0), 0)])
def test_nlvr_labels_are_true_or_false(label, expected):
    t = get_task("nlvr")
    rows = [row | {"label": label} for row in _raw_rows("nlvr")]
    assert adapt_splits(t, {"train": rows, "val": rows}, None)[0]["val"][0]["label"] == expected
    bad = [row | {"label": "maybe"} for row in rows]
    _one_line(lambda: adapt_splits(t, {"train": bad, "val": bad}, None), "train row 0", "'label'", "'maybe'")


@pytest.mark.parametrize("task", [t for t in SCHEMA_TASKS if get_task(t).row_schema.any_of])
def test_a_model_needs_its_part_of_the_rows(task):
    """Label-free rows with only one of the parts: a model that reads the other is one line
    naming the part and its accepted names."""
    t, schema = get_task(task), get_task(task).row_schema
    model, _ = _setup(task)
    t.check_model(model)
    probe = adapt_splits(t, {"train": _raw_rows(task), "val": _raw_rows(task)}, None)[0]["val"]
    t.check_data(model, probe)
    used = {"image": "images", "text": "texts"}
    read = [f for f in schema.any_of if used.get(f) in probe.parts]
    assert read
    for field in read:
        rows = [{k: v for k, v in row.items() if k not in _names(schema, field)} for row in _raw_rows(task)]
        splits, _ = adapt_splits(t, {"train": rows, "val": rows}, None)
        _one_line(lambda: t.check_data(model, splits["train"]), "train", f"no {field} field",
                  *_names(schema, field))


@pytest.mark.parametrize("task", [t for t in SCHEMA_TASKS if get_task(t).row_schema.trainer_needs])
def test_trainer_rows_need_their_settings(task):
    t = get_task(task)
    _, processor = _setup(task)
    cols = _trainer_columns(task, processor)
    rows = [{k: v[i] for k, v in cols.items()} for i in range(ROWS)]
    for setting, needed in t.row_schema.trainer_needs.items():
        setattr(t, setting, "__other__")
        _one_line(lambda: adapt_splits(t, {"train": rows, "val": rows}, processor), f"{setting}={needed!r}")


@pytest.mark.parametrize("task", [t for t in SCHEMA_TASKS if not get_task(t).row_schema.takes_trainer])
def test_raw_only_tasks_refuse_trainer_rows(task):
    t = get_task(task)
    rows = [{"pixel_values": np.zeros((3, SIZE, SIZE), np.float32), "input_ids": [1, 2, 3]}] * 2
    _one_line(lambda: adapt_splits(t, {"train": rows, "val": rows}, None), "cannot take processed tensors",
              t.row_schema.raw_only, *t.row_schema.required)


@pytest.mark.parametrize("value", [iter([{}]), {"train": []}, "rows.json"])
def test_other_objects_are_refused(value):
    t = get_task(SCHEMA_TASKS[0])
    message = _one_line(lambda: adapt_splits(t, {"train": value, "val": value}, None), "train is a")
    assert re.search(r"datasets\.Dataset|map-style", message)
