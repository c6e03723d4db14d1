"""The model card of a compressed folder (:mod:`upop.checkpoint.card`): Hub metadata, how to load,
what was pruned, the run's table; a user's own README.md is never replaced."""

from __future__ import annotations

import yaml

import upop
from upop.checkpoint.card import MARKER, is_hub_id, model_card
from upop.models.folders import make_model

from .test_engine import _random_masks


def _compressed(tmp_path, base_model=""):
    model = make_model("vit")
    masks = upop.attach_masks(model)
    _random_masks(masks, seed=1)
    upop.prune(model, masks)
    if base_model:
        model.upop_plan.base_model = base_model
    return model, upop.save_compressed(model, tmp_path / "out")


def _meta(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_the_card_has_hub_metadata_and_both_ways_to_load(tmp_path):
    model, folder = _compressed(tmp_path, base_model="google/vit-base-patch16-224")
    card = (folder / "README.md").read_text()
    meta = _meta(card)
    assert meta["library_name"] == "transformers"
    assert meta["base_model"] == "google/vit-base-patch16-224"
    assert {"upop", "pruning"} <= set(meta["tags"])
    assert "upop.load_compressed(" in card
    assert "AutoModelForImageClassification.from_pretrained(" in card and "trust_remote_code=True" in card
    removed = model.upop_plan.achieved_ratio["params"]
    assert f"{removed:.1%}" in card


def test_a_local_base_model_is_not_hub_metadata(tmp_path):
    (tmp_path / "my-model").mkdir()
    _, folder = _compressed(tmp_path, base_model=str(tmp_path / "my-model"))
    card = (folder / "README.md").read_text()
    assert "base_model" not in _meta(card)
    assert str(tmp_path / "my-model") in card
    assert is_hub_id("org/name") and not is_hub_id(str(tmp_path / "my-model")) and not is_hub_id("a/b/c")


def test_save_pretrained_keeps_a_card_the_user_wrote(tmp_path):
    model, folder = _compressed(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("# my own card\n")
    loaded = upop.load_compressed(folder)
    loaded.save_pretrained(mine)
    assert (mine / "README.md").read_text() == "# my own card\n"
    again = tmp_path / "again"
    loaded.save_pretrained(again)  # a fresh folder gets upop's card, and a second save rewrites it
    assert MARKER in (again / "README.md").read_text()
    loaded.save_pretrained(again)
    assert MARKER in (again / "README.md").read_text()


def test_the_report_adds_the_dense_and_compressed_table(tmp_path):
    model, _ = _compressed(tmp_path)
    report = {"task": "classification", "speedup": 1.8, "latency": {"device": "cpu", "batch": 32},
              "dense": {"params": 5_000_000, "metrics": {"top1": 0.81}},
              "compressed": {"params": 2_600_000, "metrics": {"top1": 0.79}}}
    card = model_card(model.upop_plan, "AutoModelForImageClassification", report)
    assert "| top1 | 0.81 | 0.79 |" in card
    assert "| parameters | 5,000,000 | 2,600,000 |" in card
    assert "Speedup 1.80x" in card
