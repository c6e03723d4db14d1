"""Per-head query/key norms (Qwen3's ``q_norm`` / ``k_norm``, issue #29): for every registered tiny
model whose attention normalises its queries and keys over ``head_dim`` before RoPE, pruning
rotary pairs keeps each norm's weight at the kept channels (pruned order) and its DENSE divisor
(the masked channels are zeros in the mean of squares), so the pruned model is the masked one; a
plain norm of the narrower width is not. Whole heads leave the norms as they are. A family
registered later with such norms is in this table by its registration."""

from __future__ import annotations

import pytest
import torch

import upop
from upop.arch import TINY
from upop.arch._rope import HeadNormsAttention
from upop.arch._spec import ROPE_PAIRS
from upop.models.folders import make_model

from ._forwards import ids

TOL = 1e-5  # fp32 masked == pruned


def _has_head_norms(model) -> bool:
    return any(all(hasattr(m, n) for n in HeadNormsAttention.head_norms) for m in model.modules())


#: tiny models of the registry with per-head query/key norms
HEAD_NORMED = [name for name in TINY if _has_head_norms(make_model(name))]


def _model(name):
    """The tiny model with random per-head norm weights (ones would hide the channel order)."""
    model = make_model(name).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if all(hasattr(m, n) for n in HeadNormsAttention.head_norms):
                for n in HeadNormsAttention.head_norms:
                    w = getattr(m, n).weight
                    w.copy_(torch.rand(w.shape, generator=g) * 1.5 + 0.25)
    return model


def _logits(model):
    with torch.no_grad():
        return model(input_ids=ids(length=20)).logits


def _drop_pairs(masks) -> None:
    """Attention channel groups keep unit 0 and every other unit (heads and MLPs are kept)."""
    with torch.no_grad():
        for name, m in masks.items():
            group = masks.group(name)
            if group.kind == "attention" and not group.whole_heads:
                keep = torch.zeros(m.numel())
                keep[::2] = 1.0
                m.copy_(keep)


def _head_norms(model):
    """(attention module name, norm name, norm) of every per-head norm."""
    return [(name, n, getattr(m, n)) for name, m in model.named_modules() if isinstance(m, HeadNormsAttention)
            for n in m.head_norms]


def test_the_table_is_not_empty():
    assert HEAD_NORMED, "no registered tiny model has per-head query/key norms"


@pytest.mark.parametrize("granularity", ("head-dim", "both"))
@pytest.mark.parametrize("name", HEAD_NORMED)
def test_pruned_head_norms_keep_the_dense_divisor(name, granularity, tmp_path):
    model = _model(name)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    masks = upop.attach_masks(model, upop.find_groups(model, granularity=granularity))
    _drop_pairs(masks)
    masked = _logits(model)
    upop.prune(model, masks)
    pruned = _logits(model)
    exact = (masked - pruned).abs().max()
    assert exact <= TOL
    norms = _head_norms(model)
    assert norms
    for module_name, norm_name, norm in norms:
        module = model.get_submodule(module_name)
        pairs = getattr(module, ROPE_PAIRS)
        width, full = 2 * len(pairs), dense[f"{module_name}.{norm_name}.weight"]
        assert width < full.numel() and norm.weight.numel() == width == module.head_dim
        channels = pairs + [p + full.numel() // 2 for p in pairs]  # first halves, then second halves
        torch.testing.assert_close(norm.weight.detach(), full[channels] * (full.numel() / width) ** 0.5)
    # the folder rebuilds the same model
    loaded = upop.load_compressed(upop.save_compressed(model, tmp_path / "c")).eval()
    assert (_logits(loaded) - pruned).abs().max() <= TOL
    # a plain norm of the narrower width (kept weights, dense epsilon) divides by the kept width
    with torch.no_grad():
        for module_name, norm_name, norm in norms:
            module = model.get_submodule(module_name)
            pairs, full = getattr(module, ROPE_PAIRS), dense[f"{module_name}.{norm_name}.weight"]
            norm.weight.copy_(full[pairs + [p + full.numel() // 2 for p in pairs]])
            dense_norm = make_model(name).get_submodule(f"{module_name}.{norm_name}")
            setattr(norm, module.head_norm_eps, getattr(dense_norm, module.head_norm_eps))
    wrong = (masked - _logits(model)).abs().max()
    assert wrong > 100 * TOL and wrong > 100 * exact


@pytest.mark.parametrize("name", HEAD_NORMED)
def test_whole_heads_leave_the_head_norms(name):
    model = _model(name)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    masks = upop.attach_masks(model, upop.find_groups(model, granularity="head"))
    with torch.no_grad():
        for name_, m in masks.items():
            if masks.group(name_).kind == "attention":
                m[1:].zero_()  # one K/V head (and its query heads) kept
    masked = _logits(model)
    upop.prune(model, masks)
    assert (masked - _logits(model)).abs().max() <= TOL
    norms = _head_norms(model)
    assert norms
    for module_name, norm_name, norm in norms:
        assert getattr(model.get_submodule(module_name), ROPE_PAIRS, None) is None
        assert torch.equal(norm.weight.detach(), dense[f"{module_name}.{norm_name}.weight"])
