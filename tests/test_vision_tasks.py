"""Classification (ViT/DeiT) and segmentation (Segmenter) end to end through the CLI on tiny
models and tiny Shapes data: data -> make-model -> compress (search, prune, retrain) ->
load_compressed -> evaluate reproduces the report. Masked == pruned equivalence of the
Segmenter is in tests/_families.py (run by tests/test_engine.py)."""

from __future__ import annotations

import json

import pytest

import upop
from upop.cli.main import main

from ._families import largest_chunk_share

TINY = ["--search-epochs", "1", "--retrain-epochs", "1", "--batch-size", "8", "--lr", "1e-3",
        "--eval-batch-size", "16", "--no-progress"]

# task -> (model family, extra make-model options, model class, metric names)
CASES = {
    "classification": ("deit", [], "DeiTForImageClassificationWithTeacher", {"top1", "top5"}),
    "segmentation": ("segmenter", ["--num-labels", "7"], "SegmenterForSemanticSegmentation", {"miou", "pixel_acc"}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def world(request, tmp_path_factory):
    task = request.param
    family, extra, _, _ = CASES[task]
    root = tmp_path_factory.mktemp(task)
    assert main(["data", "shapes", "--task", task, "--out", str(root / "data"), "--train", "24", "--val", "10",
                 "--test", "10", "--image-size", "32"]) == 0
    assert main(["make-model", family, "--out", str(root / "model"), "--size", "tiny", "--image-size", "32",
                 *extra]) == 0
    return task, root


def test_compress_reload_and_evaluate(world, tmp_path, capsys):
    task, root = world
    _, _, cls_name, metric_names = CASES[task]
    out = tmp_path / "run"
    code = main(["compress", "--model", str(root / "model"), "--task", task, "--data", str(root / "data"),
                 "--out", str(out), "--ratio", "0.3", *TINY])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert 0.3 <= report["achieved_ratio"] < 0.3 + largest_chunk_share(root / "model", report)
    assert report["compressed"]["params"] < report["dense"]["params"]
    assert report["compressed"]["flops"] < report["dense"]["flops"]
    assert set(report["compressed"]["metrics"]) == metric_names
    model = upop.load_compressed(out / "compressed")
    assert type(model).__name__ == cls_name
    plan = upop.read_plan(out / "compressed")
    if task == "segmentation":  # the unified search ranks encoder and decoder units together
        pruned = {g.modality for g in plan.groups.values() if len(g.kept) < g.dense_units}
        assert pruned == {"vision", "decoder"}
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out / "compressed"), "--task", task, "--data", str(root / "data")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics == pytest.approx(report["compressed"]["metrics"], abs=1e-9)
