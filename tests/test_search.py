"""The UPop search: schedule, selection, projection, budget, resume, FLOPs budget."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import upop
from upop.errors import ConfigError
from upop.search.mask_search import UPopSearch, ratio_at

from ._families import FAMILIES


@pytest.mark.parametrize("total", [1, 7, 100])
def test_ratio_schedule_matches_formula(total):
    p = 0.6
    for t in range(total):
        expected = p * math.sqrt((1 - math.cos(math.pi * (t + 1) / total)) / 2)
        assert ratio_at(p, t, total) == pytest.approx(expected, abs=1e-12)
    assert ratio_at(p, total - 1, total) == p
    values = [ratio_at(p, t, total) for t in range(total)]
    assert values == sorted(values)


def _batch(step, n=4, length=12, size=32):
    g = torch.Generator().manual_seed(1000 + step)
    return {
        "input_ids": torch.randint(9, 100, (n, length), generator=g),
        "pixel_values": torch.randn(n, 3, size, size, generator=g),
    }


def _clip_loss(model, batch):
    out = model(**batch)
    labels = torch.arange(out.logits_per_image.shape[0])
    return (F.cross_entropy(out.logits_per_image, labels) + F.cross_entropy(out.logits_per_text, labels)) / 2


def _run(total=12, interval=3, ratio=0.5, cost="params", method="upop", stop_at=None, state=None, text_tokens=None):
    torch.manual_seed(0)
    model = FAMILIES["clip"][0]().train()
    groups = upop.find_groups(model, text_tokens=text_tokens)
    masks = upop.attach_masks(model, groups)
    search = UPopSearch(masks, ratio=ratio, total_steps=total, interval=interval, cost=cost, method=method)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        search.load_state_dict(state["search"])
        start = search.step_count
    masks_seen = []
    for t in range(start, total):
        loss = _clip_loss(model, _batch(t)) + search.sparsity_loss()
        loss.backward()
        search.step(t)
        opt.step()
        opt.zero_grad()
        masks_seen.append({k: v.detach().clone() for k, v in masks.items()})
        if stop_at is not None and t == stop_at:
            return {"model": model.state_dict(), "opt": opt.state_dict(), "search": search.state_dict()}
    return model, masks, search, masks_seen


def test_short_search_ends_binary_within_one_unit_of_budget():
    model, masks, search, seen = _run()
    values = torch.cat([m.detach() for _, m in masks.items()])
    assert set(values.unique().tolist()) <= {0.0, 1.0}
    removed = sum(g.param_cost * int((masks[g.name] == 0).sum()) for g in masks.groups)
    total = upop.prunable_cost(masks.groups)
    max_unit = max(g.param_cost for g in masks.groups)
    assert abs(removed - 0.5 * total) <= max_unit
    assert all(int((masks[g.name] == 1).sum()) >= 1 for g in masks.groups)
    # progressive: masks before the end were in (0, 1) for the prune set, never 0
    middle = seen[len(seen) // 2]
    inner = torch.cat(list(middle.values()))
    assert ((inner > 0) & (inner < 1)).any() and not (inner == 0).any()
    # the allocation is unified: it is not the same ratio in every group
    kept = [int((masks[g.name] == 1).sum()) / g.num_units for g in masks.groups]
    assert max(kept) - min(kept) > 0.1
    plan = upop.prune(model, masks)
    assert plan.achieved_ratio["params"] == pytest.approx(removed / total)


def test_one_shot_keeps_masks_at_one_until_the_end():
    _, masks, search, seen = _run(method="one-shot")
    for snapshot in seen[:-1]:
        assert all(bool((v == 1).all()) for v in snapshot.values())
    final = torch.cat([m.detach() for _, m in masks.items()])
    assert (final == 0).any() and set(final.unique().tolist()) <= {0.0, 1.0}


def test_resume_from_state_dict_gives_the_same_masks():
    _, masks_full, _, _ = _run()
    state = _run(stop_at=5)
    _, masks_resumed, search, _ = _run(state=state)
    for name, m in masks_full.items():
        assert torch.equal(m, masks_resumed[name])
    assert search.done and len(search.history) == 4


def test_determinism_for_a_seed():
    _, a, _, _ = _run()
    _, b, _, _ = _run()
    assert all(torch.equal(a[n], b[n]) for n in a.keys())


def test_flops_budget_measured_with_flop_counter():
    length = 12
    model, masks, search, _ = _run(cost="flops", ratio=0.4, text_tokens=length)
    groups = masks.groups
    dense = FAMILIES["clip"][0]()
    inputs = {"input_ids": _batch(0)["input_ids"][:1], "pixel_values": _batch(0)["pixel_values"][:1]}
    removed_units = {g.name: int((masks[g.name] == 0).sum()) for g in groups}
    upop.prune(model, masks)
    f_dense = upop.count_flops(dense, inputs)
    f_pruned = upop.count_flops(model, inputs)
    measured_removed = f_dense - f_pruned
    # the per-unit FLOPs formula is exact against the counter...
    assert measured_removed == sum(g.flop_cost * removed_units[g.name] for g in groups)
    # ...so the removed share of the prunable FLOPs is within one unit of the target
    total = upop.prunable_cost(groups, "flops")
    assert abs(measured_removed / total - 0.4) <= max(g.flop_cost for g in groups) / total
    # a FLOPs budget spends differently from a parameter budget: vision units cost more here
    vision = [g for g in groups if g.modality == "vision"]
    text = [g for g in groups if g.modality == "text"]
    assert vision[0].flop_cost / vision[0].param_cost > text[0].flop_cost / text[0].param_cost


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"ratio": 0.0}, "ratio"),
        ({"ratio": 1.0}, "ratio"),
        ({"total_steps": 0}, "total_steps"),
        ({"interval": 0}, "interval"),
        ({"cost": "latency"}, "cost"),
        ({"method": "magic"}, "method"),
    ],
)
def test_bad_search_settings(kwargs, field):
    model = FAMILIES["clip"][0]()
    masks = upop.attach_masks(model)
    args = {"ratio": 0.5, "total_steps": 10, "interval": 2, **kwargs}
    with pytest.raises(ConfigError, match=field):
        UPopSearch(masks, **args)


def test_mask_grads_accumulate_in_float64_and_nonfinite_is_caught():
    model = FAMILIES["clip"][0]().train()
    masks = upop.attach_masks(model)
    search = UPopSearch(masks, ratio=0.5, total_steps=10, interval=3)
    for t in range(2):
        _clip_loss(model, _batch(t)).backward()
        first = masks.groups[0].name
        grad = masks[first].grad.double().clone()
        before = masks.grad_sum[first].clone()
        search.step(t)
        assert torch.allclose(masks.grad_sum[first], before + grad)
        model.zero_grad()
    masks[masks.groups[0].name].grad = torch.full_like(masks[masks.groups[0].name], float("nan"))
    with pytest.raises(FloatingPointError, match="step 2"):
        search.step(2)


def test_round_to_that_cannot_meet_the_budget_is_a_clear_error():
    masks = upop.attach_masks(FAMILIES["clip"][0]())
    with pytest.raises(ConfigError, match="round_to=16"):
        UPopSearch(masks, ratio=0.5, total_steps=4, interval=2, round_to=16)


@pytest.mark.parametrize("round_to", [1, 2, 4])
def test_round_to_keeps_multiples_and_meets_the_budget(round_to):
    model = FAMILIES["clip"][0]().train()
    masks = upop.attach_masks(model)
    search = UPopSearch(masks, ratio=0.5, total_steps=4, interval=2, round_to=round_to)
    for t in range(4):
        _clip_loss(model, _batch(t)).backward()
        search.step(t)
        model.zero_grad()
    total = upop.prunable_cost(masks.groups)
    removed = sum(g.param_cost * int((masks[g.name] == 0).sum()) for g in masks.groups)
    chunk = max(g.param_cost for g in masks.groups) * round_to
    assert 0.5 * total <= removed < 0.5 * total + chunk
    for g in masks.groups:
        kept = int((masks[g.name] == 1).sum())
        if g.num_units >= round_to:
            assert kept % round_to == 0 and kept >= round_to
        else:
            assert kept == g.num_units


def test_chunk_selection_with_chunks_of_one_unit_is_the_plain_selection():
    model = FAMILIES["clip"][0]().train()
    masks = upop.attach_masks(model)
    _clip_loss(model, _batch(0)).backward()
    masks.accumulate_grads()
    search = UPopSearch(masks, ratio=0.4, total_steps=4, interval=2)
    for ratio in (0.1, 0.4, 0.9):
        assert torch.equal(search.select(ratio), search._select_chunks(search.scores(), ratio))
    search.round_to = 10**6  # no group is that wide: nothing can be removed
    assert not search.select(0.4).any()


def test_uniform_allocation_prunes_the_same_share_of_every_group():
    _, masks, _, _ = _run(total=6, interval=2, ratio=0.5)  # unified reference for contrast
    unified = [int((masks[g.name] == 0).sum()) / g.num_units for g in masks.groups]
    torch.manual_seed(0)
    model = FAMILIES["clip"][0]().train()
    masks = upop.attach_masks(model)
    search = UPopSearch(masks, ratio=0.5, total_steps=6, interval=2, allocation="uniform")
    for t in range(6):
        _clip_loss(model, _batch(t)).backward()
        search.step(t)
        model.zero_grad()
    for g in masks.groups:
        removed = int((masks[g.name] == 0).sum())
        # within one unit of half the group, whatever the scores
        assert abs(removed - g.num_units / 2) <= 1
    assert max(unified) - min(unified) > 0.1  # ...while the unified search allocates unevenly
