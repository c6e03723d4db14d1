"""The Torch-Pruning side-by-side of benchmarks/ablations.py: same budget, same units (whole heads,
MLP neurons), residual width kept, forward intact. Skipped without the [peer] extra."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torch_pruning")

import upop  # noqa: E402
import upop.models.folders  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import ablations  # noqa: E402


def _inputs(family: str) -> dict:
    g = torch.Generator().manual_seed(0)
    inputs = {"pixel_values": torch.randn(4, 3, 32, 32, generator=g)}
    if family == "clip":
        inputs["input_ids"] = torch.randint(4, 120, (4, 7), generator=g)
        inputs["attention_mask"] = torch.ones(4, 7, dtype=torch.long)
    return inputs


def _grad_fn(family: str, inputs: dict):
    """A stand-in for the task loss: contrastive for CLIP, cross-entropy on fixed labels for ViT."""

    def grad_fn(model) -> None:
        out = model(**inputs)
        if family == "clip":
            labels = torch.arange(out.logits_per_image.shape[0])
            loss = F.cross_entropy(out.logits_per_image, labels) + F.cross_entropy(out.logits_per_text, labels)
        else:
            loss = F.cross_entropy(out.logits, torch.arange(out.logits.shape[0]) % out.logits.shape[1])
        loss.backward()

    return grad_fn


def _shapes(out, prefix: str = "") -> dict:
    shapes = {}
    for key, value in out.items():
        if hasattr(value, "items"):
            shapes.update(_shapes(value, f"{prefix}{key}."))
        elif torch.is_tensor(value):
            shapes[prefix + key] = tuple(value.shape)
    return shapes


@pytest.mark.parametrize("family,ratio,importance", [
    ("clip", 0.5, "taylor"), ("clip", 0.75, "taylor"), ("vit", 0.5, "taylor"), ("vit", 0.75, "magnitude"),
])
def test_torch_pruning_matches_budget_and_keeps_widths(family, ratio, importance):
    torch.manual_seed(0)
    dense = upop.models.folders.make_model(family, size="tiny", image_size=32).eval()
    inputs = _inputs(family)
    dense_params = upop.count_params(dense)
    groups = upop.find_groups(dense)

    model, info = ablations.torch_pruning_prune(dense, ratio, inputs, _grad_fn(family, inputs), importance=importance)

    assert upop.count_params(dense) == dense_params  # pruned a copy
    # budget: UPop's definition (removed share of the prunable cost), reached closely
    pruned_groups = upop.find_groups(model)
    achieved = 1 - upop.prunable_cost(pruned_groups) / upop.prunable_cost(groups)
    assert info["achieved"] == pytest.approx(achieved)
    assert abs(achieved - ratio) <= 0.01, info
    # nothing but prunable parameters went
    assert dense_params - upop.count_params(model) == upop.prunable_cost(groups) - upop.prunable_cost(pruned_groups)

    by_name = {g.name: g for g in pruned_groups}
    fewer_heads = fewer_neurons = False
    for g in groups:
        p = by_name[g.name]
        consumer = model.get_submodule(g.consumer)
        # residual width unchanged
        assert consumer.out_features == dense.get_submodule(g.consumer).out_features
        for name in g.producers:
            assert model.get_submodule(name).in_features == dense.get_submodule(name).in_features
        if g.kind == "attention":
            module = model.get_submodule(g.module)
            q, k, v = (model.get_submodule(n) for n in g.producers)
            head_dim = g.num_units
            assert p.num_units == head_dim and module.head_dim == head_dim  # head dim kept
            assert q.out_features % head_dim == 0  # whole heads
            assert q.out_features == k.out_features == v.out_features == consumer.in_features
            assert 1 <= p.num_heads == q.out_features // head_dim <= g.num_heads
            fewer_heads |= p.num_heads < g.num_heads
        else:
            assert 1 <= p.num_units == consumer.in_features <= g.num_units
            fewer_neurons |= p.num_units < g.num_units
    assert fewer_heads and fewer_neurons

    with torch.no_grad():
        dense_out, out = dense(**inputs), model.eval()(**inputs)
    assert _shapes(out) == _shapes(dense_out)
    assert all(torch.isfinite(v).all() for v in out.values() if torch.is_tensor(v))


def test_version_is_recorded():
    assert ablations.torch_pruning_version()
