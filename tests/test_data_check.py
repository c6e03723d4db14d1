"""``upop data check`` finds every planted fault in one pass; the model's id2label decides label
ids (remapped, refused on disagreement, or set for a new classifier); a file that goes bad after
the check still fails with a DataError naming it."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from upop.cli.main import main
from upop.data import shapes_writer
from upop.data.ade20k import ADE20KDataset
from upop.data.check import check_data
from upop.data.imagefolder import ImageClassificationCollator, load_imagefolder
from upop.data.retrieval import RetrievalDataset
from upop.data.shapes_vision import SEGMENTATION_CLASSES
from upop.errors import DataError, show
from upop.models.folders import make_model
from upop.tasks.classification import ClassificationTask
from upop.tasks.registry import task_names
from upop.tasks.segmentation import SegmentationTask

TASKS = task_names()


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """A small Shapes data set of every task (10 images per split: one per classification class)."""
    root = tmp_path_factory.mktemp("shapes")
    for task in TASKS:
        shapes_writer(task)(root / task, train=10, val=10, test=10, image_size=32)
    return root


def _copy(clean: Path, tmp: Path, task: str) -> Path:
    return Path(shutil.copytree(clean / task, tmp / task))


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _bomb_header(path: Path) -> None:
    """Keep the PNG but make its header claim 100000 x 100000 pixels."""
    raw = bytearray(path.read_bytes())
    raw[16:24] = struct.pack(">II", 100_000, 100_000)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    path.write_bytes(bytes(raw))


def _retrieval_faults(d: Path) -> list[str]:
    _edit_json(d / "train.json", lambda e: e[0].update(caption="   "))
    _edit_json(d / "val.json", lambda e: e[1].update(image="images/new\nline.png"))
    _truncate(d / "images" / "test_00001.png")
    (d / "images" / "train_00003.png").write_text("not an image")
    _bomb_header(d / "images" / "val_00004.png")
    return ["empty caption", "new\\nline.png", "test_00001.png", "train_00003.png", "val_00004.png"]


def _classification_faults(d: Path) -> list[str]:
    for p in (d / "train" / "red_circle").iterdir():
        p.unlink()
    shutil.rmtree(d / "val" / "blue_star")
    bad = sorted((d / "test" / "green_circle").iterdir())[0]
    bad.write_bytes(b"GIF89a broken")
    Image.new("F", (32, 32), 0.5).save(d / "test" / "red_square" / "float.tif")
    (d / "test" / "red_square" / "float.png").write_bytes((d / "test" / "red_square" / "float.tif").read_bytes())
    _truncate(sorted((d / "train" / "blue_square").iterdir())[0])
    return ["red_circle", "blue_star", bad.name, "float.png", "blue_square"]


def _segmentation_faults(d: Path) -> list[str]:
    ann = sorted((d / "annotations" / "training").iterdir())
    Image.new("RGB", (32, 32), (1, 1, 1)).save(ann[0])                            # colour-coded mask
    values = np.asarray(Image.open(ann[1])).copy()
    values[0, 0] = 9                                                               # 7 classes: 0..7 allowed
    Image.fromarray(values, mode="L").save(ann[1])
    Image.fromarray(np.ones((16, 16), np.uint8), mode="L").save(ann[2])           # size differs from image
    image = sorted((d / "images" / "validation").iterdir())[0]
    (d / "annotations" / "validation" / image.name).unlink()                       # image without annotation
    (d / "images" / "testing" / "test_00002.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # truncated at the signature
    return [ann[0].name, ann[1].name, ann[2].name, image.name, "test_00002.png"]


FAULTS = {"retrieval": _retrieval_faults, "classification": _classification_faults,
          "segmentation": _segmentation_faults}


@pytest.mark.parametrize("task", sorted(FAULTS))
def test_check_lists_every_planted_fault_in_one_run(task, clean, tmp_path, capsys):
    data = _copy(clean, tmp_path, task)
    needles = FAULTS[task](data)
    capsys.readouterr()
    assert main(["data", "check", "--task", task, "--data", str(data)]) == 2
    out, err = capsys.readouterr()
    problems = [line for line in out.splitlines() if not line.startswith(("train:", "val:", "test:"))]
    assert len(problems) == 5, problems
    for needle in needles:  # each fault is its own line, naming the file
        assert sum(needle in line for line in problems) == 1, (needle, problems)
    assert all(line.isprintable() for line in out.splitlines())
    assert err.strip().splitlines()[-1] == f"upop: error: 5 problems in {show(str(data))}"


@pytest.mark.parametrize("task", TASKS)
def test_clean_data_passes(task, clean, capsys):
    assert main(["data", "check", "--task", task, "--data", str(clean / task)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out[:3]] == ["train", "val", "test"] and len(out) == 4
    assert out[-1].startswith("no problems")


def test_full_check_decodes_what_the_header_check_cannot(clean, tmp_path):
    data = _copy(clean, tmp_path, "retrieval")
    image = data / "images" / "test_00000.png"
    Image.open(image).convert("RGB").save(image, format="JPEG")  # a JPEG under a .png name is fine ...
    assert check_data("retrieval", data).ok and check_data("retrieval", data, images="full").ok
    image.write_bytes(image.read_bytes()[:-20])  # ... one cut in its pixel data is only found by decoding it
    assert check_data("retrieval", data, images="header").ok
    report = check_data("retrieval", data, images="full")
    assert len(report.problems) == 1 and "test_00000.png" in report.problems[0]
    with pytest.raises(DataError, match="1 problem in .*test_00000.png"):
        report.raise_for_problems()


def test_a_file_broken_after_the_check_raises_naming_it(clean, tmp_path):
    data = _copy(clean, tmp_path, "retrieval")
    assert check_data("retrieval", data).ok
    dataset = RetrievalDataset.from_split(data, "train")
    dataset.items[2].image.write_bytes(b"overwritten")
    with pytest.raises(DataError, match="train_00002.png") as info:
        dataset[2]
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- class names


def _classifier(names=None):
    model = make_model("vit", num_labels=10, image_size=32)
    if names is not None:
        model.config.id2label = dict(enumerate(names))
        model.config.label2id = {n: i for i, n in enumerate(names)}
    return model


def _collated_labels(dataset) -> list[int]:
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    collate = ImageClassificationCollator(ViTImageProcessorPil(size={"height": 32, "width": 32}))
    return collate([dataset[i] for i in range(len(dataset))])["labels"].tolist()


def _spell(name: str) -> str:
    return name.replace("_", " ").title()  # "red_circle" -> "Red Circle"


@pytest.mark.parametrize("spelling", [str, _spell])
def test_labels_follow_the_models_id2label(spelling, clean):
    train = load_imagefolder(clean / "classification", ("train",))["train"]
    names = [spelling(c) for c in reversed(train.classes)]  # the model numbers the classes backwards
    model = _classifier(names)
    ClassificationTask().check_data(model, train)
    expected = [9 - index for _, index in train.items]
    assert _collated_labels(train) == expected and train.labels == expected
    assert model.config.id2label[0] == spelling(train.classes[-1])  # the model's names are kept


def test_disagreeing_names_are_refused(clean):
    train = load_imagefolder(clean / "classification", ("train",))["train"]
    names = ["cat", "dog"] + train.classes[2:]
    with pytest.raises(DataError) as info:
        ClassificationTask().check_data(_classifier(names), train)
    message = str(info.value)
    assert "'blue_square'" in message and "'cat'" in message and "\n" not in message


def test_names_of_another_vocabulary_keep_the_folder_order(clean):
    """ImageNet's case: WordNet-id folders (n01440764) against a Hub model's names ("tench")."""
    train = load_imagefolder(clean / "classification", ("train",))["train"]
    ClassificationTask().check_data(_classifier([f"species {i}" for i in range(10)]), train)
    assert train.labels == [index for _, index in train.items]


def test_a_new_classifier_takes_the_data_names(clean, tmp_path):
    train = load_imagefolder(clean / "classification", ("train",))["train"]
    model = _classifier()
    ClassificationTask().check_data(model, train)
    assert model.config.id2label == dict(enumerate(train.classes))
    assert model.config.label2id == {c: i for i, c in enumerate(train.classes)}
    assert _collated_labels(train) == [index for _, index in train.items]
    model.save_pretrained(tmp_path / "named")
    saved = json.loads((tmp_path / "named" / "config.json").read_text())
    assert saved["id2label"]["3"] == train.classes[3]


def test_segmentation_labels_follow_the_models_id2label(clean):
    dataset = ADE20KDataset.from_split(clean / "segmentation", "val")
    raw = np.asarray(Image.open(dataset.pairs[0][1])).astype(np.int64)
    model = make_model("segmenter", num_labels=7, image_size=32)
    model.config.id2label = dict(enumerate(reversed(SEGMENTATION_CLASSES)))
    SegmentationTask().check_data(model, dataset)
    label = np.asarray(dataset[0]["label"]).astype(np.int64)
    assert np.array_equal(label, np.where(raw == 0, 255, 7 - raw))  # value v (class v - 1) -> id 6 - (v - 1)
    model.config.id2label = {0: "sky", **{i: n for i, n in enumerate(reversed(SEGMENTATION_CLASSES)) if i}}
    with pytest.raises(DataError, match="classes.json"):
        SegmentationTask().check_data(model, dataset)
    torch.testing.assert_close(torch.tensor(dataset.label_ids), torch.arange(6, -1, -1))  # unchanged by a refusal
