"""Users' data as they have it (``upop.compress(train=..., val=...)``, :mod:`upop.data.user_rows`):
table-driven over the tasks that declare a ``row_schema``."""

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
from upop.data.user_rows import adapt_splits
from upop.errors import DataError
from upop.tasks import get_task, task_names

DOC = Path(__file__).resolve().parent.parent / "docs" / "data.md"
#: the tasks that read rows from Python, and those of them that take Trainer-style rows
TASKS = task_names()
SCHEMA_TASKS = [name for name in TASKS if get_task(name).row_schema is not None]
TRAINER_TASKS = [name for name in SCHEMA_TASKS if get_task(name).row_schema.trainer]
SIZE, ROWS = 32, 8


def _family(task: str) -> str:
    """The smallest tiny model the registry declares for ``task`` (the cheapest run)."""
    from upop.arch import pairs
    from upop.models.folders import make_model

    tinies = [tiny for tiny, served in pairs() if served == task]
    return min(tinies, key=lambda tiny: sum(p.numel() for p in make_model(tiny).parameters()))


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(n)]


def _raw_rows(task: str, n: int = ROWS) -> list[dict]:
    """Rows with the schema's required fields, as a user has them (the first alias where there is one)."""
    schema = get_task(task).row_schema
    values = {"image": _images(n), "label": [i % 2 for i in range(n)],
              "caption": [f"a {c} circle" for c in ("red", "blue") * n][:n]}
    return [{(schema.aliases.get(f) or (f,))[0]: values[f][i] for f in schema.required} for i in range(n)]


def _trainer_columns(task: str, processor, n: int = ROWS) -> dict[str, list]:
    """Trainer-style columns of ``task`` made by ``processor`` (pixel_values, labels, input_ids...)."""
    schema = get_task(task).row_schema
    images = _images(n)
    image_processor = getattr(processor, "image_processor", processor)
    cols = {"pixel_values": [x.numpy() for x in image_processor(images=images, return_tensors="pt")["pixel_values"]],
            "labels": [i % 2 for i in range(n)]}
    if "input_ids" in schema.trainer:
        enc = processor.tokenizer([f"a {c} circle" for c in ("red", "blue") * n][:n])
        cols["input_ids"], cols["attention_mask"] = enc["input_ids"], enc["attention_mask"]
    return {k: v for k, v in cols.items() if k in (*schema.trainer, *schema.trainer_optional)}


def _setup(task: str):
    from upop.models.folders import make_processor, make_model

    family = _family(task)
    processor = make_processor(family, SIZE)
    tokenizer = getattr(processor, "tokenizer", None)
    vocab = {"vocab_size": len(tokenizer)} if tokenizer is not None else {}
    model = make_model(family, image_size=SIZE, num_labels=2, **vocab)
    return model, processor


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
    _, processor = _setup(task)
    t = get_task(task)
    splits, same = adapt_splits(t, {"train": _raw_rows(task), "val": _raw_rows(task)}, processor)
    assert same is processor  # raw rows: the processor is the user's
    batch = t.collator(processor)([splits["train"][i] for i in range(len(splits["train"]))])
    assert batch["pixel_values"].shape[0] == ROWS
    assert batch["index"].tolist() == list(range(ROWS))


@pytest.mark.parametrize("task", TRAINER_TASKS)
def test_trainer_rows_are_fed_as_they_are(task):
    """The task's own collator returns the user's pixel_values and token ids unchanged."""
    _, processor = _setup(task)
    t = get_task(task)
    t.augment = "none"
    cols = _trainer_columns(task, processor)
    rows = [{k: v[i] for k, v in cols.items()} for i in range(ROWS)]
    splits, wrapped = adapt_splits(t, {"train": rows, "val": rows}, processor)
    batch = t.collator(wrapped)([splits["train"][i] for i in range(ROWS)])
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


def _one_line(fn, *needles):
    with pytest.raises(DataError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


@pytest.mark.parametrize("task", SCHEMA_TASKS)
def test_a_missing_field_names_split_field_and_accepted_names(task):
    t, schema = get_task(task), get_task(task).row_schema
    missing = schema.required[-1]
    rows = [{k: v for k, v in row.items() if k not in (missing, *schema.aliases.get(missing, ()))}
            for row in _raw_rows(task)]
    _one_line(lambda: adapt_splits(t, {"train": rows[:1] * 2, "val": _raw_rows(task)}, None),
              "train", repr(missing), *schema.aliases.get(missing, ()), *rows[0])


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
                                   columns={"nonsense": "image"}), "'nonsense'", *t.row_schema.required)


@pytest.mark.parametrize("task", SCHEMA_TASKS)
def test_columns_map_other_names(task):
    t, schema = get_task(task), get_task(task).row_schema
    field = schema.required[-1]
    rows = [{("their_" + k if k in (field, *schema.aliases.get(field, ())) else k): v for k, v in row.items()}
            for row in _raw_rows(task)]
    splits, _ = adapt_splits(t, {"train": rows, "val": rows}, None, columns={field: "their_" + next(iter(
        k for k in _raw_rows(task)[0] if k in (field, *schema.aliases.get(field, ()))))})
    assert len(splits["val"]) >= 1
    _one_line(lambda: adapt_splits(t, {"train": rows, "val": rows}, None, columns={field: "absent"}),
              "'absent'", "train", "their_")


@pytest.mark.parametrize("task", [t for t in SCHEMA_TASKS if get_task(t).row_schema.trainer_needs])
def test_trainer_rows_need_their_settings(task):
    t = get_task(task)
    _, processor = _setup(task)
    cols = _trainer_columns(task, processor)
    rows = [{k: v[i] for k, v in cols.items()} for i in range(ROWS)]
    for setting, needed in t.row_schema.trainer_needs.items():
        setattr(t, setting, "__other__")
        _one_line(lambda: adapt_splits(t, {"train": rows, "val": rows}, processor), f"{setting}={needed!r}")


@pytest.mark.parametrize("task", [t for t in SCHEMA_TASKS if not get_task(t).row_schema.trainer])
def test_raw_only_tasks_refuse_trainer_rows(task):
    t = get_task(task)
    rows = [{"pixel_values": np.zeros((3, SIZE, SIZE), np.float32), "input_ids": [1, 2, 3]}] * 2
    _one_line(lambda: adapt_splits(t, {"train": rows, "val": rows}, None), "cannot take processed tensors",
              *t.row_schema.required)


@pytest.mark.parametrize("value", [iter([{}]), {"train": []}, "rows.json"])
def test_other_objects_are_refused(value):
    t = get_task(SCHEMA_TASKS[0])
    message = _one_line(lambda: adapt_splits(t, {"train": value, "val": value}, None), "train is a")
    assert re.search(r"datasets\.Dataset|map-style", message)
