"""``upop make-model`` names the classes of a classifier / segmenter after its Shapes data set in
``config.id2label`` / ``label2id`` (not ``LABEL_i``), numbered as the data set's reader numbers
them, so a run on that data keeps the ids and a pipeline shows the names."""

from __future__ import annotations

import json

import pytest

from upop.cli.main import main
from upop.data.labels import model_class_names
from upop.models.folders import load_any
from upop.tasks import get_task

# family -> (Shapes task, first and last class name in id order)
CASES = {
    "vit": ("classification", "blue_square", "yellow_triangle"),
    "deit": ("classification", "blue_square", "yellow_triangle"),
    "dinov2": ("classification", "blue_square", "yellow_triangle"),
    "segmenter": ("segmentation", "background", "cross"),
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    for task in ("classification", "segmentation"):
        assert main(["data", "shapes", "--task", task, "--out", str(root / task), "--train", "10", "--val", "10",
                     "--test", "10", "--image-size", "32"]) == 0
    return root


@pytest.mark.parametrize("family", sorted(CASES))
def test_make_model_names_the_shapes_classes(family, shapes, tmp_path, capsys):
    task_name, first, last = CASES[family]
    assert main(["make-model", family, "--out", str(tmp_path / "m"), "--image-size", "32"]) == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    names = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    assert names[0] == first and names[-1] == last and len(set(names)) == len(names)
    assert config["label2id"] == {n: i for i, n in enumerate(names)}
    model, _ = load_any(tmp_path / "m")
    assert model_class_names(model.config) == names  # real names, not transformers' LABEL_i
    # the Shapes data set's reader numbers its classes the same way: its labels are the model's ids
    task = get_task(task_name)
    data = task.load_splits(shapes / task_name, splits=("val",))["val"]
    assert list(data.classes) == names
    task.check_data(model, data)
    assert data.label_ids == list(range(len(names)))
    assert model_class_names(model.config) == names


def test_num_labels_given_keeps_default_names(tmp_path):
    assert main(["make-model", "vit", "--out", str(tmp_path / "m"), "--image-size", "32", "--num-labels", "3"]) == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}


@pytest.mark.parametrize("family", ["clip", "bert"])
def test_models_without_shapes_classes_are_unchanged(family, tmp_path):
    assert main(["make-model", family, "--out", str(tmp_path / "m"), "--image-size", "32"]) == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config.get("id2label", {"0": "LABEL_0"}).get("0") == "LABEL_0"


def test_pipeline_shows_the_class_names(tmp_path):
    import numpy as np
    import transformers
    from PIL import Image

    assert main(["make-model", "vit", "--out", str(tmp_path / "m"), "--image-size", "32"]) == 0
    classify = transformers.pipeline("image-classification", model=str(tmp_path / "m"), device="cpu")
    labels = {p["label"] for p in classify(Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)), top_k=10)}
    assert "red_circle" in labels and not any(label.startswith("LABEL_") for label in labels)
