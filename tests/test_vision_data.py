"""Vision task metrics on hand-computed cases, the Shapes vision writers, the ImageFolder and
ADE20K readers, and the table of bad inputs (one-line error naming the file, CLI exit code 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from upop.cli.main import main
from upop.data.ade20k import ADE20KDataset
from upop.data.imagefolder import load_imagefolder
from upop.data.shapes_vision import CLASSIFICATION_CLASSES, SEGMENTATION_CLASSES, write_classification, write_segmentation
from upop.errors import DataError
from upop.tasks.classification import ClassificationTask, topk_accuracy
from upop.tasks.segmentation import confusion_matrix, segmentation_metrics

# ----------------------------------------------------------------------------- metrics


def test_topk_accuracy_by_hand():
    logits = torch.tensor([[0.1, 0.5, 0.2, 0.0, 0.3, 0.9],   # label 1: rank 2
                           [0.9, 0.1, 0.2, 0.3, 0.4, 0.5],   # label 0: rank 1
                           [0.9, 0.8, 0.7, 0.6, 0.5, 0.0]])  # label 5: rank 6
    out = topk_accuracy(logits, torch.tensor([1, 0, 5]))
    assert out == pytest.approx({"top1": 100 / 3, "top5": 200 / 3})
    # fewer than 5 classes: top-5 counts every class
    assert topk_accuracy(torch.tensor([[0.0, 1.0]]), torch.tensor([0]))["top5"] == 100.0


def test_miou_with_absent_class_and_ignore_by_hand():
    # 4 classes; class 3 appears neither in GT nor in the prediction; 255 pixels are ignored
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 0]])
    conf = confusion_matrix(pred, target, 4)
    assert int(conf.sum()) == 6  # ignored pixels are not counted, whatever the prediction
    m = segmentation_metrics(conf)
    # IoU: class 0 = 1 / (2 + 2 - 1) = 1/3, class 1 = 2 / (2 + 3 - 2) = 2/3, class 2 = 1 / 2; class 3 absent
    assert m["miou"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert m["pixel_acc"] == pytest.approx(100 * 4 / 6)


def test_miou_counts_a_class_only_predicted():
    conf = confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 0]), 3)
    assert segmentation_metrics(conf)["miou"] == pytest.approx(100 * (0.5 + 0.0) / 2)


@pytest.mark.parametrize("cls_name", ["ViTForImageClassification", "DeiTForImageClassification",
                                      "DeiTForImageClassificationWithTeacher"])
def test_classification_loss_for_every_class(cls_name):
    import transformers

    cfg_cls = transformers.ViTConfig if cls_name.startswith("ViT") else transformers.DeiTConfig
    cfg = cfg_cls(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=32,
                  patch_size=8, num_labels=3)
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(cfg)
    batch = {"pixel_values": torch.randn(2, 3, 32, 32), "labels": torch.tensor([0, 2])}
    loss = ClassificationTask().loss(model, batch)
    out = model(pixel_values=batch["pixel_values"])
    if cls_name.endswith("WithTeacher"):
        expected = (torch.nn.functional.cross_entropy(out.cls_logits, batch["labels"])
                    + torch.nn.functional.cross_entropy(out.distillation_logits, batch["labels"])) / 2
    else:
        expected = torch.nn.functional.cross_entropy(out.logits, batch["labels"])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(DataError, match="num_labels=3"):
        ClassificationTask().loss(model, {**batch, "labels": torch.tensor([0, 3])})


# ----------------------------------------------------------------------------- writers and readers


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision")
    write_classification(root / "cls", train=20, val=10, test=10, image_size=32, seed=0)
    write_segmentation(root / "seg", train=6, val=4, test=4, image_size=32, seed=0)
    return root


def test_shapes_classification_is_balanced_and_reused(data):
    splits = load_imagefolder(data / "cls")
    assert splits["train"].classes == sorted(f"{c}_{k}" for c, k in CLASSIFICATION_CLASSES)
    assert np.bincount(splits["train"].labels).tolist() == [2] * 10
    sample = splits["val"][3]
    assert sample["image"].size == (32, 32) and 0 <= sample["label"] < 10
    again = write_classification(data / "cls", train=20, val=10, test=10, image_size=32, seed=0)
    assert again["reused"] is True


def test_shapes_segmentation_reads_back(data):
    ds = ADE20KDataset.from_split(data / "seg", "train")
    assert ds.num_classes == len(SEGMENTATION_CLASSES) == 7 and len(ds) == 6
    label = np.asarray(ds[0]["label"])
    assert label.shape == (32, 32) and label.max() < 7 and 0 in label  # background is class 0
    assert len(ADE20KDataset.from_split(data / "seg", "test")) == 4  # testing/ exists


def _copy(data, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(data / name, dst)
    return dst


def _cls_empty_class(data, tmp_path):
    d = _copy(data, tmp_path, "cls")
    folder = d / "train" / "red_circle"
    for p in folder.iterdir():
        p.unlink()
    return "classification", d, str(folder)


def _cls_missing_class(data, tmp_path):
    d = _copy(data, tmp_path, "cls")
    shutil.rmtree(d / "val" / "blue_star")
    return "classification", d, "blue_star"


def _cls_corrupt_image(data, tmp_path):
    d = _copy(data, tmp_path, "cls")
    bad = sorted((d / "test" / "red_square").iterdir())[0]
    bad.write_bytes(b"not a png")
    return "classification", d, str(bad)


def _seg_size_mismatch(data, tmp_path):
    d = _copy(data, tmp_path, "seg")
    ann = sorted((d / "annotations" / "testing").iterdir())[0]
    Image.fromarray(np.ones((16, 16), dtype=np.uint8), mode="L").save(ann)
    return "segmentation", d, str(ann)


def _seg_label_out_of_range(data, tmp_path):
    d = _copy(data, tmp_path, "seg")
    ann = sorted((d / "annotations" / "testing").iterdir())[1]
    arr = np.asarray(Image.open(ann)).copy()
    arr[0, 0] = 9  # 7 classes: values allowed 0..7
    Image.fromarray(arr, mode="L").save(ann)
    return "segmentation", d, str(ann)


def _seg_missing_annotation(data, tmp_path):
    d = _copy(data, tmp_path, "seg")
    image = sorted((d / "images" / "testing").iterdir())[2]
    (d / "annotations" / "testing" / image.name).unlink()
    return "segmentation", d, str(image)


# case -> (make the bad copy, CLI command that meets it: compress reads the splits first, evaluate
# reads every sample of the test split)
BAD = {
    "class folder without images": (_cls_empty_class, "compress"),
    "class missing from a split": (_cls_missing_class, "compress"),
    "corrupt image": (_cls_corrupt_image, "evaluate"),
    "annotation size differs from image": (_seg_size_mismatch, "evaluate"),
    "label value outside the class range": (_seg_label_out_of_range, "evaluate"),
    "image without annotation": (_seg_missing_annotation, "compress"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_a_one_line_error_naming_the_file(case, data, tmp_path, capsys):
    make_bad, command_name = BAD[case]
    task, folder, needle = make_bad(data, tmp_path)
    splits = ("train", "val", "test")
    with pytest.raises(DataError) as info:  # the reader / the sample raises ...
        datasets = {"classification": load_imagefolder, "segmentation":
                    lambda d, s: {x: ADE20KDataset.from_split(d, x) for x in s}}[task](folder, splits)
        for ds in datasets.values():
            for i in range(len(ds)):
                ds[i]
    assert needle in str(info.value) and "\n" not in str(info.value)
    # ... and the CLI turns it into one line and exit code 2 (evaluate reads every test sample)
    capsys.readouterr()
    model = tmp_path / "model"
    family, labels = ("vit", "10") if task == "classification" else ("segmenter", "7")
    assert main(["make-model", family, "--out", str(model), "--image-size", "32", "--num-labels", labels]) == 0
    capsys.readouterr()
    command = [command_name, "--model", str(model), "--task", task, "--data", str(folder)]
    if command_name == "compress":
        command += ["--out", str(tmp_path / "o"), "--search-epochs", "1", "--retrain-epochs", "0", "--no-progress"]
    assert main(command) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("upop: error:") and needle in err and "\n" not in err


@pytest.mark.parametrize("task, family, labels, expected", [
    ("classification", "vit", "7", "10 class folders"),
    ("segmentation", "segmenter", "10", "7 classes"),
])
def test_class_count_must_match_the_model(task, family, labels, expected, data, tmp_path, capsys):
    model = tmp_path / "model"
    assert main(["make-model", family, "--out", str(model), "--image-size", "32", "--num-labels", labels]) == 0
    capsys.readouterr()
    folder = data / ("cls" if task == "classification" else "seg")
    assert main(["evaluate", "--model", str(model), "--task", task, "--data", str(folder)]) == 2
    err = capsys.readouterr().err
    assert expected in err and f"num_labels={labels}" in err


def test_segmenter_saves_loads_and_ignores_255(tmp_path):
    import transformers

    import upop.models.folders as M
    from upop.models.segmenter import SegmenterConfig, SegmenterForSemanticSegmentation

    model = M.make_model("segmenter", num_labels=5)
    model.save_pretrained(tmp_path / "seg")
    assert isinstance(transformers.AutoConfig.from_pretrained(str(tmp_path / "seg")), SegmenterConfig)
    loaded = SegmenterForSemanticSegmentation.from_pretrained(str(tmp_path / "seg")).eval()
    pixels = torch.randn(1, 3, 32, 32)
    labels = torch.full((1, 32, 32), 255)
    labels[0, 3, 4] = 2
    with torch.no_grad():
        out = loaded(pixel_values=pixels, labels=labels)
        assert torch.equal(out.logits, model(pixel_values=pixels).logits)
    assert out.logits.shape == (1, 5, 32, 32)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :, 3, 4], torch.tensor([2]))
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
