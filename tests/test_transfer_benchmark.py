"""benchmarks/transfer.py: the --quick run writes every row and cell, its data holds the held-out
(colour, kind) pairs out of the task set and in every test image, and its helpers decide right."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import upop
import upop.models.folders
from upop.tasks import get_task

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import _transfer_data as D  # noqa: E402
import transfer  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One --quick run in a temporary cache and results folder: (results JSON, markdown, cache)."""
    tmp = tmp_path_factory.mktemp("transfer")
    env = {**os.environ, "UPOP_BENCH_RESULTS": str(tmp / "results"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "benchmarks/transfer.py", "--quick", "--cache", str(tmp / "cache")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp / "results" / "transfer-quick.json").read_text())
    return data, (tmp / "results" / "transfer-quick.md").read_text(), tmp / "cache"


@pytest.mark.slow  # a benchmark's quick variant: CI's second stage, with the others
def test_quick_run_has_every_row_and_cell(quick):
    data, md, _ = quick
    fields = {f.name for f in dataclasses.fields(upop.UPopConfig)}
    expected = {("dense (pretrained, zero-shot)", 0.0), ("dense fine-tuned", 0.0), ("upop (default)", 0.5),
                ("magnitude", 0.5)}
    if "distill" in fields:
        expected |= {("upop, distill=logits", 0.5), ("upop, distill=logits+hidden", 0.5)}
    else:
        assert any("distill" in note for note in data["notes"])
    got = {(r["method"], r["ratio"]) for r in data["rows"]}
    assert expected <= got, expected - got
    for r in data["rows"]:
        assert r["seed"] == 0
        for key, _ in transfer.METRICS:
            assert 0.0 <= r[key] <= 100.0, (r["method"], key, r[key])
        if r["ratio"] > 0:  # every compression trains the same number of steps
            assert r["steps"] == data["steps"] > 0
            assert abs(r["achieved"] - 0.5) < 0.1
    assert [w["ratio"] for w in data["winners"]] == [0.5] and data["winners"][0]["beats_all_by_2std"] is None
    assert data["pretrained"]["params"] > 0 and data["protocol"]["ratios"] == [0.5]
    for _, title in transfer.METRICS:
        assert f"### {title}" in md
    assert "| upop (default) | — |" in md and "Command:" in md


@pytest.mark.slow  # shares the quick run
def test_held_out_pairs_absent_from_task_set_and_in_every_test_image(quick):
    *_, cache = quick
    (task,), (pretrain,) = cache.glob("task-*"), cache.glob("pretrain-*")
    held = set(D.HELD_OUT)
    for split in ("train", "val", "seen"):
        scenes = D.split_scenes(task, split)
        assert scenes and not any(s & held for s in scenes), split
    test = D.split_scenes(task, "test")
    assert test and all(s & held for s in test)
    # the captions say the same: no task caption names a held-out pair
    train = json.loads((task / "train.json").read_text())
    assert train and not any(D.mentions_held_out(e["caption"]) for e in train)
    tests = json.loads((task / "test.json").read_text())
    assert len(tests) == len(test) and all(D.mentions_held_out(c) for e in tests for c in e["caption"])
    # the pretraining corpus is unfiltered: the held-out pairs are in it
    assert any(s & held for s in D.split_scenes(pretrain, "train"))
    assert len(D.split_scenes(pretrain, "train")) == transfer.QUICK["data"]["pretrain"]


def test_data_settings_and_bad_pairs(tmp_path):
    assert D.digest(D.data_settings()) == D.digest(D.data_settings())
    assert D.digest(D.data_settings()) != D.digest(D.data_settings(task=999))
    with pytest.raises(upop.ConfigError, match="pink"):
        D.data_settings(held_out=[("pink", "circle")])
    with pytest.raises(upop.ConfigError, match="rule"):
        D.write_folder(tmp_path, {"train": (2, "some", 1)}, image_size=16, seed=0, name="x")


def _rows(method, ratio, values):
    return [{"method": method, "ratio": ratio, "seed": s, "r_mean": v} for s, v in enumerate(values)]


@pytest.mark.parametrize("rows, winner, clear", [
    (_rows("a", 0.5, [50, 51, 49]) + _rows("b", 0.5, [40, 41, 39]), "a", True),   # 10 apart, std 1
    (_rows("a", 0.5, [50, 56, 44]) + _rows("b", 0.5, [40, 46, 34]), "a", False),  # 10 apart, std 6
    (_rows("a", 0.5, [50]) + _rows("b", 0.5, [40]), "a", None),                   # one seed: no verdict
    (_rows("a", 0.5, [50, 51, 49]) + _rows("b", 0.5, [50, 51, 49]) + _rows("c", 0.5, [30, 30, 30]), "a", False),
])
def test_winner_and_two_std_rule(rows, winner, clear):
    (found,) = transfer.winners(rows, [0.5])
    assert found["winner"] == winner
    assert (found["beats_all_by_2std"] if found["seeds"] > 1 else None) == clear


def test_rows_equal_to_the_default_are_not_counted_as_rivals():
    rows = _rows("upop (default)", 0.5, [50, 51, 49]) + _rows("b", 0.5, [40, 41, 39])
    rows += [{**r, "method": "upop, score=gradient", "same_as": "upop (default)"} for r in rows[:3]]
    (found,) = transfer.winners(rows, [0.5])
    assert found["winner"] == "upop (default)" and found["beats_all_by_2std"] is True


@pytest.mark.slow  # shares the quick run
def test_distilled_retraining_changes_the_result(quick):
    """The baselines' retraining with a distillation setting runs and its term acts (different
    weights from the same seed without it); without one it is the plain fine-tune."""
    import copy

    import torch
    from _baselines import distill_setting, retrain

    pytest.importorskip("upop.distill.distiller")
    *_, cache = quick
    (folder,) = cache.glob("task-*")
    task = get_task("retrieval")
    splits = task.load_splits(folder, ("train", "val"))
    processor = upop.models.folders.make_processor("clip", 32)
    dense = transfer.clip_model(len(processor.tokenizer), 32, **transfer.QUICK["model"])
    assert distill_setting(upop.UPopConfig(distill="none")) is None
    # the default "auto" is the logits on retrieval (the cached teacher), nothing on other tasks
    assert distill_setting(upop.UPopConfig()) == {"mode": "logits", "weight": 4.0, "temperature": 1.0}
    assert distill_setting(upop.UPopConfig(), task="classification") is None
    kw = dict(epochs=1, lr=1e-3, batch_size=16, seed=0)
    plain = retrain(copy.deepcopy(dense), task, splits["train"], splits["val"], processor, **kw)
    setting = {"mode": "logits+hidden", "weight": 1.0, "temperature": 1.0}
    from upop.distill.distiller import make_teacher

    distilled = retrain(copy.deepcopy(dense), task, splits["train"], splits["val"], processor,
                        teacher=make_teacher(dense), distill=setting, **kw)
    moved = [not torch.equal(a, b) for a, b in zip(plain.parameters(), distilled.parameters())]
    assert any(moved)
    assert any(not torch.equal(a, b) for a, b in zip(dense.parameters(), distilled.parameters()))


def test_weight_rows_are_valid_configs_with_their_weight():
    """--methods weight: one row per distillation mode and weight, each a valid config that sets
    the weight it is labelled with (so a resumed log matches its rows by label)."""
    base = dict(search_epochs=2, retrain_epochs=2)
    rows, notes = transfer.method_rows(["weight"], base)
    assert not notes and len(rows) == len(transfer.VARIANTS["distill"]) * len(transfer.DISTILL_WEIGHTS)
    for label, kind, over in rows:
        cfg = upop.UPopConfig(ratio=0.75, **base, **over)
        assert kind == "upop" and cfg.score == "taylor" and cfg.distill in transfer.VARIANTS["distill"]
        assert label.endswith(f"distill_weight={cfg.distill_weight:g}") and f"distill={cfg.distill}," in label
