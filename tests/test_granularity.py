"""Attention granularity (``find_groups(..., granularity=...)``, ``--granularity``): head-dim channels
(the paper) or whole heads, table-driven over every family of tests/_families.py."""

from __future__ import annotations

import json

import pytest
import torch

import upop
from upop.arch._spec import vision_tokens
from upop.errors import CheckpointError, ConfigError
from upop.prune import PruningPlan
from upop.search import UPopSearch, resolve_round_to

from ._families import FAMILIES, prunable_params

NAMES = sorted(FAMILIES)
GRANULARITIES = ("head-dim", "head")
HEADS, HEAD_DIM = 4, 8  # tiny models: width 32, 4 heads


def _random_masks(masks, seed=1, drop=0.4):
    """Masks of 0/1 per unit, every group keeping at least one unit (unit 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in masks.items():
            keep = (torch.rand(m.numel(), generator=g) >= drop).float()
            keep[0] = 1.0
            m.copy_(keep)


def _head_width(module) -> int:
    for attr in ("head_dim", "attention_head_size"):
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    raise AssertionError(f"{type(module).__name__} has no head width attribute")


def _head_count(module) -> int:
    attrs = ("num_heads", "num_attention_heads")
    return next(getattr(module, a) for a in attrs if isinstance(getattr(module, a, None), int))


def _check_whole_heads(model, groups, plan) -> None:
    """Every attention module keeps head_dim (attribute and weight shapes) and has the kept number of heads."""
    for g in groups:
        if g.kind != "attention":
            continue
        kept = len(plan.groups[g.name].kept)
        module = model.get_submodule(g.module)
        assert _head_width(module) == HEAD_DIM
        assert _head_count(module) == kept
        for name in g.producers:
            rows = model.get_submodule(name).out_features
            assert rows == (3 if g.fused_qkv else 1) * kept * HEAD_DIM
        assert model.get_submodule(g.consumer).in_features == kept * HEAD_DIM


@pytest.mark.parametrize("family", NAMES)
def test_head_groups_and_exact_costs(family):
    """A head unit owns head_dim channels of one head: same totals as channels, exact per unit."""
    model = FAMILIES[family][0]()
    channels = upop.find_groups(model)
    heads = upop.find_groups(model, granularity="head")
    assert [g.name for g in heads] == [g.name for g in channels]
    for c, h in zip(channels, heads):
        if c.kind == "mlp":
            assert h == c
            continue
        assert (h.granularity, h.num_units, h.num_heads, h.head_dim) == ("head", HEADS, HEADS, HEAD_DIM)
        assert c.granularity == "head-dim" and c.num_units == HEAD_DIM
        for kind in ("params", "flops"):  # one (head, channel) cell costs the same either way
            assert h.cost(kind) * c.num_heads == c.cost(kind) * h.head_dim
    for kind in ("params", "flops"):
        assert upop.prunable_cost(heads, kind) == upop.prunable_cost(channels, kind)
    assert upop.prunable_cost(heads) == prunable_params(model, heads)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("family", NAMES)
def test_masked_equals_pruned(family, granularity):
    build, forward, _ = FAMILIES[family]
    model = build()
    dense_params = upop.count_params(model)
    groups = upop.find_groups(model, granularity=granularity)
    with torch.no_grad():
        dense = forward(model)
    masks = upop.attach_masks(model, groups)
    _random_masks(masks)
    removed = sum(g.param_cost * int((masks[g.name] == 0).sum()) for g in masks.groups)
    with torch.no_grad():
        masked = forward(model)
        assert max((a - b).abs().max().item() for a, b in zip(dense, masked)) > 1e-4  # the masks act
        plan = upop.prune(model, masks)
        pruned = forward(model)
    for a, b in zip(masked, pruned):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= 1e-5
    assert upop.count_params(model) == dense_params - removed
    assert {gp.granularity for gp in plan.groups.values() if gp.kind == "attention"} == {granularity}
    if granularity == "head":
        assert any(len(gp.kept) < gp.dense_units == HEADS for gp in plan.groups.values())
        _check_whole_heads(model, groups, plan)
        # a pruned model's groups read the new head counts back (what a second pass or a report sees)
        for g in upop.find_groups(model, granularity="head"):
            if g.kind == "attention":
                assert g.num_units == len(plan.groups[g.name].kept) and g.head_dim == HEAD_DIM


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("family", NAMES)
def test_round_trip(family, granularity, tmp_path):
    build, forward, _ = FAMILIES[family]
    model = build()
    groups = upop.find_groups(model, granularity=granularity)
    masks = upop.attach_masks(model, groups)
    _random_masks(masks, seed=3)
    plan = upop.prune(model, masks)
    upop.save_compressed(model, tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "upop_plan.json").read_text())["groups"]
    # whole-head groups say so; channel plans are written exactly as before (no key)
    assert {g.get("granularity", "head-dim") for g in saved.values() if g["kind"] == "attention"} == {granularity}
    assert all("granularity" not in g for g in saved.values() if g["kind"] == "mlp")
    loaded = upop.load_compressed(tmp_path / "ckpt")
    assert type(loaded) is type(model)
    with torch.no_grad():
        for a, b in zip(forward(model), forward(loaded)):
            assert torch.equal(a, b)
    if granularity == "head":
        _check_whole_heads(loaded, groups, plan)
        assert loaded.upop_plan.granularity == "head"


@pytest.mark.parametrize("family", ["vit", "clip-vision", "dinov2", "siglip-vision", "deit"])
def test_head_flop_costs_match_the_counter(family):
    """The FLOPs a pruned head saves are what torch's flop counter sees (vision towers: exact token counts)."""
    build, forward, _ = FAMILIES[family]
    model = build()
    groups = upop.find_groups(model, granularity="head")
    cfg = getattr(model.config, "vision_config", model.config)
    tokens = vision_tokens(cfg, upop.arch.get_spec(model).vision_extra_tokens)
    assert all(g.tokens_q == tokens for g in groups)
    pixels = torch.randn(2, 3, 32, 32)
    dense = upop.count_flops(model, {"pixel_values": pixels})
    masks = upop.attach_masks(model, groups)
    _random_masks(masks, seed=7)
    removed = sum(g.flop_cost * int((masks[g.name] == 0).sum()) for g in masks.groups)
    upop.prune(model, masks)
    assert dense - upop.count_flops(model, {"pixel_values": pixels}) == 2 * removed


@pytest.mark.parametrize("family", ["clip", "blip-retrieval", "bert"])
def test_short_head_search_gives_a_valid_plan(family):
    """A few UPop steps over whole heads: masks end 0/1, the plan meets the budget within one unit."""
    build, forward, _ = FAMILIES[family]
    model = build().train()
    groups = upop.find_groups(model, granularity="head")
    masks = upop.attach_masks(model, groups)
    ratio, steps = 0.4, 6
    search = UPopSearch(masks, ratio=ratio, total_steps=steps, interval=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    for t in range(steps):
        loss = sum(out.float().pow(2).mean() for out in forward(model)) + search.sparsity_loss()
        loss.backward()
        search.step(t)
        optimizer.step()
        optimizer.zero_grad()
    assert search.done
    for _, m in masks.items():
        assert set(m.detach().unique().tolist()) <= {0.0, 1.0}
    plan = upop.prune(model, masks)
    share = max(g.param_cost for g in groups) / upop.prunable_cost(groups)
    assert ratio - 1e-9 <= plan.achieved_ratio["params"] <= ratio + share
    assert any(len(gp.kept) < gp.dense_units for gp in plan.groups.values() if gp.kind == "attention")
    assert all(gp.granularity == "head" for gp in plan.groups.values() if gp.kind == "attention")
    _check_whole_heads(model, groups, plan)
    with torch.no_grad():
        assert all(torch.isfinite(out).all() for out in forward(model.eval()))


def test_mask_expansion_layouts():
    model = FAMILIES["blip-retrieval"][0]()
    fused = next(g for g in upop.find_groups(model, granularity="head") if g.fused_qkv)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])
    per_head = mask.repeat_interleave(HEAD_DIM)
    assert torch.equal(fused.expand_mask(mask), per_head.repeat(3))  # [3, heads, head_dim]
    assert fused.fused_rows([0, 2]).tolist() == [
        r + s * HEADS * HEAD_DIM for s in range(3) for r in [*range(0, 8), *range(16, 24)]]
    channels = next(g for g in upop.find_groups(model) if g.fused_qkv)
    assert torch.equal(channels.expand_mask(torch.arange(8.0)), torch.arange(8.0).repeat(3 * HEADS))


@pytest.mark.parametrize("granularity,needle", [("both", "not supported yet"), ("heads", "choose one of")])
def test_unsupported_granularity_is_a_one_line_error(granularity, needle):
    with pytest.raises(ConfigError) as info:
        upop.find_groups(FAMILIES["vit"][0](), granularity=granularity)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_config_option():
    from upop.cli import _config_from_args, build_parser

    assert upop.UPopConfig().granularity == "head-dim"
    args = build_parser().parse_args(["compress", "--model", "m", "--task", "retrieval", "--data", "d", "--out", "o",
                                      "--granularity", "head"])
    assert _config_from_args(args).granularity == "head"
    for bad, needle in ((dict(granularity="heads"), "choose one of"), (dict(granularity="head", cost="latency"),
                                                                       "cost=latency")):
        with pytest.raises(ConfigError, match=needle):
            upop.UPopConfig(**bad)


def test_round_to_auto_does_not_round_heads():
    model = FAMILIES["vit"][0]()
    assert resolve_round_to("auto", upop.find_groups(model, granularity="head"))[0] == 1
    assert resolve_round_to("auto", upop.find_groups(model)) == resolve_round_to("auto", upop.find_groups(model))
    assert resolve_round_to("auto", upop.find_groups(model))[0] == 2  # head_dim 8: the channel rule, unchanged
    assert resolve_round_to(4, upop.find_groups(model, granularity="head"))[0] == 4


def _head_plan(tmp_path):
    model = FAMILIES["clip"][0]()
    masks = upop.attach_masks(model, upop.find_groups(model, granularity="head"))
    _random_masks(masks)
    upop.prune(model, masks)
    return upop.save_compressed(model, tmp_path / "c")


def _edit(path, fn):
    file = path / "upop_plan.json"
    data = json.loads(file.read_text())
    fn(data)
    file.write_text(json.dumps(data))


def _first(data, kind):
    return next(g for g in data["groups"].values() if g["kind"] == kind)


TAMPER = {
    "unknown granularity": (lambda d: _first(d, "attention").update(granularity="heads"), "granularity is 'heads'"),
    "head granularity on an MLP": (lambda d: _first(d, "mlp").update(granularity="head"), "for an attention group"),
    # read as channels, the group's dense width is head_dim (8), not the 4 heads the plan records
    "granularity dropped": (lambda d: _first(d, "attention").pop("granularity"), "dense_units 4"),
}


@pytest.mark.parametrize("case", sorted(TAMPER))
def test_tampered_granularity_is_a_clear_error(case, tmp_path):
    path = _head_plan(tmp_path)
    edit, needle = TAMPER[case]
    _edit(path, edit)
    with pytest.raises(CheckpointError) as info:
        upop.load_compressed(path)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_plan_without_granularity_reads_as_head_dim():
    data = {"format_version": 1, "model_class": "ViTModel", "model_type": "vit", "spec": "vit",
            "groups": {"layers.0.attn": {"kind": "attention", "modality": "vision", "layer": 0, "dense_units": 8,
                                         "kept": [0, 3]}}}
    plan = PruningPlan.from_dict(data)
    assert plan.groups["layers.0.attn"].granularity == "head-dim" and plan.granularity == "head-dim"
    assert plan.to_dict()["groups"] == data["groups"]  # written back exactly as read


def test_compress_with_whole_heads_end_to_end(tmp_path):
    """``upop compress --granularity head``: the run searches heads, reports round_to 1, writes a
    plan of whole heads that loads back with the dense head_dim."""
    from upop.cli import main

    from ._families import clip_world

    world = clip_world(tmp_path / "world")
    out = tmp_path / "run"
    assert main(["compress", "--model", str(world / "model"), "--task", "retrieval", "--data", str(world / "data"),
                 "--out", str(out), "--search-epochs", "2", "--retrain-epochs", "0", "--batch-size", "8",
                 "--lr", "1e-3", "--eval-batch-size", "32", "--latency-time", "0.02", "--no-progress",
                 "--granularity", "head", "--ratio", "0.4"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["round_to"]["used"] == 1
    model = upop.load_compressed(out / "compressed")
    groups = upop.find_groups(upop.load_model(world / "model")[0], granularity="head")
    share = max(g.param_cost for g in groups) / upop.prunable_cost(groups)
    assert 0.4 <= report["achieved_ratio"] <= 0.4 + share
    plan = model.upop_plan
    assert plan.granularity == "head"
    _check_whole_heads(model, groups, plan)
