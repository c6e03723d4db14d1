"""Attention granularity (``find_groups(..., granularity=...)``, ``--granularity``): head-dim channels
(the paper), whole heads, or both ranked together (pairs of groups with exact bilinear costs),
table-driven over every family of tests/_families.py."""

from __future__ import annotations

import json

import pytest
import torch

import upop
from upop.arch._spec import vision_tokens
from upop.errors import CheckpointError, ConfigError
from upop.arch.groups import exact_cost
from upop.pruning.prune import PruningPlan
from upop.search.mask_search import UPopSearch, resolve_round_to

from ._families import FAMILIES, edit_plan, prunable_params, save_pruned_clip

NAMES = sorted(FAMILIES)
GRANULARITIES = ("head-dim", "head", "both")
#: the attention granularities a plan of each setting records
PLAN_KINDS = {"head-dim": {"head-dim"}, "head": {"head"}, "both": {"head-dim", "head"}}
HEADS, HEAD_DIM = 4, 8  # tiny models: width 32, 4 heads


def _random_masks(masks, seed=1, drop=0.4):
    """Masks of 0/1 per unit, every group keeping at least one unit (unit 0) and, from two units on,
    losing one (the last)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in masks.items():
            keep = (torch.rand(m.numel(), generator=g) >= drop).float()
            keep[-1] = 0.0  # every group of two units or more loses one (two K/V heads: one of them)
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


def _kept(masks) -> dict[str, int]:
    return {g.name: int((masks[g.name] == 1).sum()) for g in masks.groups}


def _check_widths(model, g, head_units: int, channel_units: int) -> None:
    """The attention module of ``g`` has ``head_units`` whole-head units (K/V heads with their query
    heads) of ``channel_units`` channel units (rotary pairs: two channels each): attributes and
    weight shapes."""
    queries, width = head_units * (g.num_heads // g.head_units), channel_units * (2 if g.rope else 1)
    module = model.get_submodule(g.module)
    assert (_head_count(module), _head_width(module)) == (queries, width)
    for i, name in enumerate(g.producers):
        heads = head_units if (g.kv_heads and i > 0) else queries
        assert model.get_submodule(name).out_features == (3 if g.fused_qkv else 1) * heads * width
    assert model.get_submodule(g.consumer).in_features == queries * width


def _check_pairs(model, groups, plan) -> None:
    """granularity both: every attention module has the kept heads, each of the kept channels
    (attributes and weight shapes), so num_heads * head_dim = kept heads * kept channels."""
    for g in groups:
        if g.kind == "attention" and not g.whole_heads:
            _check_widths(model, g, len(plan.groups[g.pair].kept), len(plan.groups[g.name].kept))


def _check_whole_heads(model, groups, plan) -> None:
    """Every attention module keeps head_dim (attribute and weight shapes) and has the kept number of heads."""
    for g in groups:
        if g.kind == "attention":
            _check_widths(model, g, len(plan.groups[g.name].kept), g.channel_units)


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
        # grouped-query attention: a head unit is a K/V head with its query heads
        assert (h.granularity, h.num_units, h.num_heads, h.head_dim) == ("head", h.head_units, HEADS, HEAD_DIM)
        assert h.head_units == (h.kv_heads or HEADS)
        # rotary pairs: a channel unit is two channels
        assert c.granularity == "head-dim" and c.num_units == c.channel_units == HEAD_DIM // (2 if c.rope else 1)
        for kind in ("params", "flops"):  # one (head, channel) cell costs the same either way
            assert h.cost(kind) * c.head_units == c.cell_cost(kind) * c.head_units * h.channel_units
            # what does not scale with the heads (per-head norms' weights) is a channel unit's only
            assert h.linear_cost(kind) == 0 and c.cost(kind) == c.cell_cost(kind) * c.head_units + c.linear_cost(kind)
    for kind in ("params", "flops"):  # the same cells either way; channels also own the norms' weights
        linear = sum(c.linear_cost(kind) * c.num_units for c in channels)
        assert upop.prunable_cost(heads, kind) + linear == upop.prunable_cost(channels, kind)
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
    removed = exact_cost(groups) - exact_cost(groups, _kept(masks))  # both: a pair's cells once
    with torch.no_grad():
        masked = forward(model)
        assert max((a - b).abs().max().item() for a, b in zip(dense, masked)) > 1e-4  # the masks act
        plan = upop.prune(model, masks)
        pruned = forward(model)
    for a, b in zip(masked, pruned):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= 1e-5
    assert upop.count_params(model) == dense_params - removed
    assert {gp.granularity for gp in plan.groups.values() if gp.kind == "attention"} == PLAN_KINDS[granularity]
    assert plan.granularity == granularity
    if granularity == "both":
        _check_pairs(model, groups, plan)
        assert any(len(plan.groups[g.pair].kept) < g.head_units for g in groups if g.pair)
        # read back from the pruned model: heads and widths as kept
        for g in upop.find_groups(model, granularity="both"):
            if g.kind == "attention":
                assert g.num_units == len(plan.groups[g.name].kept)
    if granularity == "head":
        assert any(len(gp.kept) < gp.dense_units == g.head_units for g in groups for gp in [plan.groups[g.name]]
                   if g.kind == "attention")
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
    attention = {g.get("granularity", "head-dim") for g in saved.values() if g["kind"] == "attention"}
    assert attention == PLAN_KINDS[granularity]
    assert all("granularity" not in g for g in saved.values() if g["kind"] == "mlp")
    loaded = upop.load_compressed(tmp_path / "ckpt")
    assert type(loaded) is type(model)
    with torch.no_grad():
        for a, b in zip(forward(model), forward(loaded)):
            assert torch.equal(a, b)
    if granularity == "head":
        _check_whole_heads(loaded, groups, plan)
    if granularity == "both":
        _check_pairs(loaded, groups, plan)
    assert loaded.upop_plan.granularity == granularity


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
    ratio = 0.4
    plan, _ = _short_search(model, forward, groups, ratio)
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


@pytest.mark.parametrize("granularity,needle", [("heads", "choose one of"), ("Both", "choose one of")])
def test_unsupported_granularity_is_a_one_line_error(granularity, needle):
    with pytest.raises(ConfigError) as info:
        upop.find_groups(FAMILIES["vit"][0](), granularity=granularity)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_config_option():
    from upop.cli.main import _config_from_args, build_parser

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
    return save_pruned_clip(tmp_path, _random_masks, granularity="head")


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
    edit_plan(path, edit)
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


@pytest.mark.slow  # CI's second stage ("both" end to end stays in the default suite)
def test_compress_with_whole_heads_end_to_end(tmp_path):
    """``upop compress --granularity head``: the run searches heads, reports round_to 1, writes a
    plan of whole heads that loads back with the dense head_dim."""
    world, out = _cli_compress(tmp_path, "head")
    report = json.loads((out / "report.json").read_text())
    assert report["round_to"]["used"] == 1
    model = upop.load_compressed(out / "compressed")
    groups = upop.find_groups(upop.load_model(world / "model")[0], granularity="head")
    share = max(g.param_cost for g in groups) / upop.prunable_cost(groups)
    assert 0.4 <= report["achieved_ratio"] <= 0.4 + share
    plan = model.upop_plan
    assert plan.granularity == "head"
    _check_whole_heads(model, groups, plan)


# granularity both: pairs, exact costs, selection --------------------------------------------------

@pytest.mark.parametrize("family", ["clip", "blip-retrieval", "bert", "segmenter"])
def test_both_gives_a_pair_per_attention_module(family):
    model = FAMILIES[family][0]()
    channels, heads = upop.find_groups(model), upop.find_groups(model, granularity="head")
    both = upop.find_groups(model, granularity="both")
    attention = [g for g in channels if g.kind == "attention"]
    assert len(both) == len(channels) + len(attention)
    by_name = {g.name: g for g in both}
    for c, h in zip(attention, (g for g in heads if g.kind == "attention")):
        pc, ph = by_name[c.name], by_name[c.name + ".heads"]
        assert (pc.pair, ph.pair) == (ph.name, pc.name)
        assert (pc.granularity, ph.granularity, ph.module) == ("head-dim", "head", c.module)
        assert (pc.param_cost, ph.param_cost, ph.num_units) == (c.param_cost, h.param_cost, HEADS)
        assert pc.cell_cost() == ph.cell_cost() == c.param_cost / HEADS
    assert all(not g.pair for g in both if g.kind == "mlp")
    for kind in ("params", "flops"):  # each module counted once, not once per group
        assert exact_cost(both, None, kind) == upop.prunable_cost(channels, kind)
    assert exact_cost(both) == prunable_params(model, channels)


def _hand_groups():
    """Two attention modules (3 heads x 4 channels, cell cost 5; 2 heads x 6 channels, cell cost 2)
    and an MLP of 5 neurons of cost 7, as granularity both finds them."""
    from upop.arch.groups import Group

    out = []
    for name, heads, width, cell in (("a", 3, 4, 5), ("b", 2, 6, 2)):
        common = dict(kind="attention", modality="vision", layer=0, num_heads=heads, producers=("q",), consumer="o",
                      fused_qkv=False, module=name, flop_cost=1, tokens_q=1, tokens_kv=1, head_dim=width)
        out.append(Group(name=name, num_units=width, param_cost=cell * heads, pair=name + ".heads", **common))
        out.append(Group(name=name + ".heads", num_units=heads, param_cost=cell * width, granularity="head", pair=name,
                         **common))
    out.append(Group(name="m", kind="mlp", modality="vision", layer=0, num_units=5, num_heads=1, producers=("f",),
                     consumer="g", fused_qkv=False, module="m", param_cost=7, flop_cost=1, tokens_q=1, tokens_kv=1))
    return out


def _hand_search(seed=0, **kwargs):
    from types import SimpleNamespace

    groups = _hand_groups()
    g = torch.Generator().manual_seed(seed)
    sums = {x.name: torch.randn(x.num_units, generator=g, dtype=torch.float64) for x in groups}
    return UPopSearch(SimpleNamespace(groups=groups, grad_sum=sums), ratio=0.5, total_steps=4, interval=2, **kwargs)


def _by_group(search, chosen):
    out, offset = {}, 0
    for g in search.masks.groups:
        out[g.name] = chosen[offset : offset + g.num_units]
        offset += g.num_units
    return out


def _brute_cost(groups, removed):
    """Exact removed cost by the definition: per module c * (H * D - H' * D'), MLP 7 per neuron."""
    cells = {"a": (5, 3, 4), "b": (2, 2, 6)}
    total = 7 * removed["m"]
    for name, (c, h, d) in cells.items():
        total += c * (h * d - (h - removed[name + ".heads"]) * (d - removed[name]))
    return total


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.8])
def test_both_selection_is_exact_and_crosses_the_budget_with_its_last_unit(ratio, seed):
    search = _hand_search(seed)
    assert search.total_cost == 5 * 12 + 2 * 12 + 7 * 5
    score = search.scores()
    chosen = search.select(ratio)
    parts = _by_group(search, chosen)
    removed = {name: int(p.sum()) for name, p in parts.items()}
    exact = _brute_cost(search.masks.groups, removed)
    assert exact == search._costs.removed(chosen)
    assert exact >= ratio * search.total_cost
    assert all(removed[g.name] < g.num_units for g in search.masks.groups)  # >= 1 head, channel, neuron each
    # the chosen set is a prefix of the ranking; without its last (lowest-scored) unit it misses the budget
    last = int(torch.nonzero(chosen).flatten()[torch.argmin(score[chosen])])
    assert score[chosen].min() >= max(float(score[i]) for i in range(score.numel()) if not chosen[i]
                                      and not _is_group_min(search, score, i))
    owner = next(name for name, p in parts.items() if p.numel() and _owns(search, name, last))
    removed[owner] -= 1
    assert _brute_cost(search.masks.groups, removed) < ratio * search.total_cost


def _owns(search, name, unit):
    offset = 0
    for g in search.masks.groups:
        if g.name == name:
            return offset <= unit < offset + g.num_units
        offset += g.num_units
    return False


def _is_group_min(search, score, unit):
    offset = 0
    for g in search.masks.groups:
        if offset <= unit < offset + g.num_units:
            return unit == offset + int(torch.argmin(score[offset : offset + g.num_units]))
        offset += g.num_units
    return False


def test_both_selection_with_round_to_rounds_channels_never_heads():
    kept_heads = []
    for seed in range(8):
        search = _hand_search(seed, round_to=2)
        for ratio in (0.3, 0.6):
            removed = {name: int(p.sum()) for name, p in _by_group(search, search.select(ratio)).items()}
            assert _brute_cost(search.masks.groups, removed) >= ratio * search.total_cost
            for g in search.masks.groups:
                kept = g.num_units - removed[g.name]
                if g.whole_heads:
                    assert kept >= 1
                    kept_heads.append((kept, g.num_units))
                else:  # channels and neurons: untouched or a multiple of 2 (the MLP's 5: a lead chunk of 1)
                    assert kept == g.num_units or (kept >= 2 and kept % 2 == 0)
    assert any(k % 2 and k < dense for k, dense in kept_heads)  # head counts are not rounded


def test_both_uniform_allocation_meets_the_share_per_module():
    search = _hand_search(1, allocation="uniform")
    ratio = 0.5
    removed = {name: int(p.sum()) for name, p in _by_group(search, search.select(ratio)).items()}
    for name, (c, h, d) in {"a": (5, 3, 4), "b": (2, 2, 6)}.items():
        cost = c * (h * d - (h - removed[name + ".heads"]) * (d - removed[name]))
        assert ratio * c * h * d <= cost < ratio * c * h * d + c * max(h, d)
    assert removed["m"] == 3  # 7 * 3 >= 0.5 * 35, 7 * 2 is not


def test_both_latency_budget_is_refused():
    with pytest.raises(ConfigError, match="granularity 'both'"):
        _hand_search(unit_costs={g.name: 1.0 for g in _hand_groups()}, cost="latency")


@pytest.mark.parametrize("round_to", [1, 2])
def test_short_both_search_gives_a_valid_plan(round_to):
    """A few UPop steps over heads and channels of a tiny CLIP: masks end 0/1, the pruned model's
    parameter count meets the budget within one unit's cost, channel widths are multiples of round_to."""
    build, forward, _ = FAMILIES["clip"]
    model = build().train()
    dense_params = upop.count_params(model)
    groups = upop.find_groups(model, granularity="both")
    ratio = 0.4
    plan, search = _short_search(model, forward, groups, ratio, round_to)
    total = exact_cost(groups)
    achieved = (dense_params - upop.count_params(model)) / total
    share = round_to * max(g.param_cost for g in groups) / total  # one unit (chunk) at its dense cost
    assert ratio - 1e-9 <= achieved <= ratio + share
    assert plan.achieved_ratio["params"] == pytest.approx(achieved)
    assert search.history[-1].removed == pytest.approx(achieved)
    assert any(len(plan.groups[g.pair].kept) < HEADS for g in groups if g.pair)
    assert any(len(plan.groups[g.name].kept) < HEAD_DIM for g in groups if g.pair and not g.whole_heads)
    for g in groups:
        if g.kind == "mlp" or not g.whole_heads:
            kept = len(plan.groups[g.name].kept)
            assert kept == g.num_units or kept % round_to == 0
    _check_pairs(model, groups, plan)
    with torch.no_grad():
        assert all(torch.isfinite(out).all() for out in forward(model.eval()))


def test_both_round_to_auto_rounds_channels_only():
    model = FAMILIES["vit"][0]()
    # head_dim 8: the channel rule gives 2, as for head-dim; the 4 heads do not pull it down to 1
    assert resolve_round_to("auto", upop.find_groups(model, granularity="both"))[0] == 2


def test_compress_with_both_end_to_end(tmp_path):
    """``upop compress --granularity both``: heads and channels searched together; the plan holds
    both groups of every attention module and loads back with the kept heads and widths."""
    from upop.cli.main import _config_from_args, build_parser

    args = build_parser().parse_args(["compress", "--model", "m", "--task", "retrieval", "--data", "d", "--out", "o",
                                      "--granularity", "both"])
    assert _config_from_args(args).granularity == "both"
    with pytest.raises(ConfigError, match="cost=latency"):
        upop.UPopConfig(granularity="both", cost="latency")
    world, out = _cli_compress(tmp_path, "both")
    report = json.loads((out / "report.json").read_text())
    used = report["round_to"]["used"]
    model = upop.load_compressed(out / "compressed")
    dense = upop.load_model(world / "model")[0]
    groups = upop.find_groups(dense, granularity="both")
    share = used * max(g.param_cost for g in groups) / exact_cost(groups)
    assert 0.4 <= report["achieved_ratio"] <= 0.4 + share
    assert (upop.count_params(dense) - upop.count_params(model)) / exact_cost(groups) == pytest.approx(
        report["achieved_ratio"])
    plan = model.upop_plan
    assert plan.granularity == "both"
    _check_pairs(model, groups, plan)


def test_trainer_callback_passes_both_through(tmp_path):
    """``add_upop(trainer, granularity="both")``: a short Trainer run prunes heads and channels, and
    what ``trainer.save_model`` writes loads back with the same outputs."""
    import transformers

    import upop.models.folders as M
    from upop.integrations.transformers.callback import add_upop

    g = torch.Generator().manual_seed(0)
    data = [{"pixel_values": x, "labels": y} for x, y in
            zip(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g))]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "t"), report_to=[], use_cpu=True, max_steps=6,
                                          per_device_train_batch_size=8, learning_rate=1e-3, seed=0, disable_tqdm=True,
                                          save_strategy="no")
    trainer = transformers.Trainer(model=M.make_model("vit"), args=args, train_dataset=data)
    callback = add_upop(trainer, ratio=0.4, granularity="both", round_to=1, interval=1)
    trainer.train()
    plan = callback.plan
    assert plan.granularity == "both" and 0.4 <= plan.achieved_ratio["params"]
    groups = upop.find_groups(M.make_model("vit"), granularity="both")
    _check_pairs(trainer.model, groups, plan)
    trainer.save_model(str(tmp_path / "saved"))
    loaded = upop.load_compressed(tmp_path / "saved")
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(pixel_values=x).logits, trainer.model.eval()(pixel_values=x).logits,
                              atol=1e-6, rtol=0)


def test_both_half_a_pair_is_refused():
    groups = [g for g in _hand_groups() if g.name != "a.heads"]
    from types import SimpleNamespace

    masks = SimpleNamespace(groups=groups, grad_sum={g.name: torch.zeros(g.num_units) for g in groups})
    with pytest.raises(ConfigError, match="'a' is paired with 'a.heads'"):
        UPopSearch(masks, ratio=0.5, total_steps=4, interval=2)



def test_prunable_cost_and_report_count_pairs_once():
    """``prunable_cost`` of the ``both`` groups equals that of the channel groups (each module
    counted once), and the report keeps heads and channels apart."""
    import upop.models.folders as M
    from upop.runs.report import allocation

    model = M.make_model("clip")
    for kind in ("params", "flops"):
        assert upop.prunable_cost(upop.find_groups(model, granularity="both"), kind) == \
            upop.prunable_cost(upop.find_groups(model), kind)
    masks = upop.attach_masks(model, upop.find_groups(model, granularity="both"))
    search = UPopSearch(masks, 0.5, 2, 1, round_to=1)
    for step in range(2):
        search.update(step)
    plan = upop.prune(model, masks)
    by = allocation(plan)["by_modality"]
    assert set(by["vision"]) == {"attention", "attention heads", "mlp"}
    heads = [g for g in plan.groups.values() if g.granularity == "head" and g.modality == "vision"]
    assert by["vision"]["attention heads"]["total"] == sum(g.dense_units for g in heads)


def _short_search(model, forward, groups, ratio, round_to=1):
    """Six search steps (a mask update every 2) on ``model``'s ``groups`` with a toy loss; checks
    the masks end at 0/1 and returns the plan of the pruned model and the search."""
    masks = upop.attach_masks(model, groups)
    search = UPopSearch(masks, ratio=ratio, total_steps=6, interval=2, round_to=round_to)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    for t in range(6):
        loss = sum(out.float().pow(2).mean() for out in forward(model)) + search.sparsity_loss()
        loss.backward()
        search.step(t)
        optimizer.step()
        optimizer.zero_grad()
    assert search.done
    for _, m in masks.items():
        assert set(m.detach().unique().tolist()) <= {0.0, 1.0}
    return upop.prune(model, masks), search


def _cli_compress(tmp_path, granularity: str):
    """``upop compress`` of a tiny CLIP on Shapes retrieval at ratio 0.4 with ``--granularity``;
    returns the data/model folder and the run folder."""
    from upop.cli.main import main

    from ._families import clip_world

    world = clip_world(tmp_path / "world")
    out = tmp_path / "run"
    assert main(["compress", "--model", str(world / "model"), "--task", "retrieval", "--data", str(world / "data"),
                 "--out", str(out), "--search-epochs", "2", "--retrain-epochs", "0", "--batch-size", "8",
                 "--lr", "1e-3", "--eval-batch-size", "32", "--latency-time", "0.02", "--no-progress",
                 "--granularity", granularity, "--ratio", "0.4"]) == 0
    return world, out
