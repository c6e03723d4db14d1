"""``cost="latency"`` (a per-group table of measured time per unit) and ``round_to="auto"``."""

from __future__ import annotations

import json

import pytest
import torch

import upop
from upop.errors import ConfigError
from upop.measure.latency_table import TABLE_FILE, _widths, load_or_measure, measure_table
from upop.search.mask_search import ROUND_TO_AUTO, UPopSearch, resolve_round_to

from ._families import FAMILIES, clip_world

# a fake device: attention costs 3 us per unit of width, an MLP 0.5 us, plus a fixed 10 us
SLOPE = {"attention": 3e-3, "mlp": 5e-4}


def _fake_timer(calls):
    def timer(fn, device, seconds):
        assert fn().dim() == 3  # the closure runs: (batch, tokens, features)
        calls.append((fn.kind, fn.width))
        return 0.01 + SLOPE[fn.kind] * fn.width
    return timer


@pytest.fixture(scope="module")
def clip():
    model = FAMILIES["clip"][0]().eval()
    return model, upop.find_groups(model)


def test_table_slopes_follow_the_timings(clip):
    model, groups = clip
    calls = []
    table = measure_table(model, groups, batch=1, device="cpu", rounds=2, timer=_fake_timer(calls))
    assert calls, "the timer was used"
    for g in groups:
        assert table["per_unit_ms"][g.name] == pytest.approx(SLOPE[g.kind], rel=1e-6)
    # layers of one shape are timed once: 2 towers x 2 kinds of shapes here, not 8 groups
    assert len(table["timings"]) == len({(g.kind, g.modality) for g in groups})


def test_no_unit_is_free(clip):
    model, groups = clip
    table = measure_table(model, groups, batch=1, device="cpu", rounds=1,
                          timer=lambda fn, d, s: 1.0 if fn.kind == "attention" else 2.0 - 1e-3 * fn.width)
    mlp = [table["per_unit_ms"][g.name] for g in groups if g.kind == "mlp"]
    assert all(v > 0 for v in mlp)  # a falling MLP time would make its units cost < 0: floored


@pytest.mark.parametrize("num_units, round_to, widths", [
    (64, 1, [1, 16, 32, 48, 64]),
    (64, 8, [8, 16, 32, 48, 64]),
    (8, 1, [1, 2, 4, 6, 8]),
    (12, 8, [8, 12]),           # the dense width is always timed
])
def test_timed_widths(num_units, round_to, widths):
    assert _widths(num_units, round_to) == widths


def test_cache_is_written_reused_and_refreshed(clip, tmp_path):
    model, groups = clip
    path = tmp_path / "state" / TABLE_FILE
    path.parent.mkdir()
    calls = []
    first, reused = load_or_measure(path, model, groups, 1, "cpu", timer=_fake_timer(calls), rounds=1)
    assert not reused and path.is_file() and json.loads(path.read_text()) == first
    n = len(calls)
    again, reused = load_or_measure(path, model, groups, 1, "cpu", timer=_fake_timer(calls), rounds=1)
    assert reused and again == first and len(calls) == n  # nothing re-timed
    other, reused = load_or_measure(path, model, groups, 4, "cpu", timer=_fake_timer(calls), rounds=1)
    assert not reused and other["key"]["batch"] == 4  # another batch is another table
    path.write_text("{not json")
    _, reused = load_or_measure(path, model, groups, 4, "cpu", timer=_fake_timer(calls), rounds=1)
    assert not reused  # a damaged cache is measured again, not trusted


def _costs(groups, attn=3.0, mlp=0.5):
    return {g.name: attn if g.kind == "attention" else mlp for g in groups}


@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_latency_budget_is_met_in_measured_time(ratio):
    model = FAMILIES["clip"][0]().train()
    masks = upop.attach_masks(model)
    costs = _costs(masks.groups)
    g = torch.Generator().manual_seed(0)
    for name in masks.keys():
        masks.grad_sum[name] = torch.randn(masks[name].numel(), generator=g, dtype=torch.float64)
    search = UPopSearch(masks, ratio=ratio, total_steps=1, interval=1, cost="latency", method="one-shot",
                        unit_costs=costs)
    search.update(0)
    total = sum(costs[g.name] * g.num_units for g in masks.groups)
    removed = sum(costs[g.name] * int((masks[g.name] == 0).sum()) for g in masks.groups)
    assert ratio * total <= removed < ratio * total + max(costs.values())
    assert search.settings()["unit_costs"] == costs  # part of the state a resume must match
    plan = upop.prune(model, masks)
    assert all(len(p.kept) >= 1 for p in plan.groups.values())


@pytest.mark.parametrize("score, ranking", [("gradient", "score"), ("taylor", "per-cost"), ("fisher", "per-cost")])
@pytest.mark.parametrize("round_to", [1, 4])
def test_latency_cost_ranks_by_importance_per_unit_of_time(score, ranking, round_to):
    """With ``cost="latency"``, a Taylor or Fisher search takes units in order of importance per
    millisecond (HALP's greedy knapsack): every pruned unit has no more importance per ms than any
    kept unit that was a candidate, so a group whose units take 6x the time gives up more of them at
    equal importance; the paper's signed gradient keeps the score-only ranking. The plan stays
    within the time budget and keeps widths multiple of ``round_to``."""
    model = FAMILIES["clip"][0]().train()
    masks = upop.attach_masks(model)
    costs = _costs(masks.groups)
    g = torch.Generator().manual_seed(0)
    for name in masks.keys():  # the same importance distribution in every group
        masks.grad_sum[name] = torch.rand(masks[name].numel(), generator=g, dtype=torch.float64) + 0.5
    search = UPopSearch(masks, ratio=0.4, total_steps=1, interval=1, cost="latency", method="one-shot",
                        unit_costs=costs, score=score, round_to=round_to)
    assert search.ranking == ranking and search.settings().get("ranking", "score") == ranking
    before = {name: masks.grad_sum[name].clone() for name in masks.keys()}
    search.update(0)
    total = sum(costs[x.name] * x.num_units for x in masks.groups)
    removed = sum(costs[x.name] * int((masks[x.name] == 0).sum()) for x in masks.groups)
    assert 0.4 * total <= removed < 0.4 * total + round_to * max(costs.values())
    assert all(int((masks[x.name] != 0).sum()) % round_to == 0 for x in masks.groups)
    share = {kind: sum(int((masks[x.name] == 0).sum()) for x in masks.groups if x.kind == kind) /
             sum(x.num_units for x in masks.groups if x.kind == kind) for kind in ("attention", "mlp")}
    if ranking == "per-cost":
        assert share["attention"] > share["mlp"]  # the 6x slower units go first at equal importance
        if round_to == 1:
            per_ms = {x.name: before[x.name] / costs[x.name] for x in masks.groups}
            pruned = torch.cat([per_ms[x.name][masks[x.name] == 0] for x in masks.groups])
            kept = torch.cat([per_ms[x.name][masks[x.name] != 0].sort().values[:-1] for x in masks.groups])  # candidates
            assert float(pruned.max()) <= float(kept.min())


def test_per_cost_ranking_needs_an_importance():
    masks = upop.attach_masks(FAMILIES["clip"][0]())
    costs = _costs(masks.groups)
    with pytest.raises(ConfigError, match="per-cost.*needs score 'taylor' or 'fisher'"):
        UPopSearch(masks, ratio=0.5, total_steps=4, interval=2, cost="latency", unit_costs=costs, ranking="per-cost")
    with pytest.raises(ConfigError, match="ranking must be one of"):
        UPopSearch(masks, ratio=0.5, total_steps=4, interval=2, ranking="time")
    assert UPopSearch(masks, ratio=0.5, total_steps=4, interval=2, score="taylor").ranking == "score"  # params


def test_a_resumed_search_cannot_switch_its_ranking():
    """The ranking is part of the search state: a state saved with the per-ms ranking does not load
    into a search with the paper's score ranking (or back), so a resume cannot mix two orders."""
    masks = upop.attach_masks(FAMILIES["clip"][0]())
    costs = _costs(masks.groups)
    make = lambda ranking: UPopSearch(masks, ratio=0.5, total_steps=4, interval=2, cost="latency", unit_costs=costs,
                                      score="taylor", ranking=ranking)
    per_ms, paper = make("per-cost"), make("score")
    with pytest.raises(ConfigError, match="per-cost"):
        paper.load_state_dict(per_ms.state_dict())
    with pytest.raises(ConfigError, match="search state was saved with settings"):
        per_ms.load_state_dict(paper.state_dict())
    make("per-cost").load_state_dict(per_ms.state_dict())  # the same ranking resumes


def test_a_changed_ranking_is_named_on_resume():
    """The run fingerprint names a changed ``--ranking``, the default shown as 'auto' (not None)."""
    from upop.engine.resume import differences

    def fp(**settings):
        return {"task": "retrieval", "settings": {"ratio": 0.5, "cost": "latency", **settings}}

    assert differences(fp(ranking="auto"), fp(ranking="score")) == ["ranking ('auto' -> 'score')"]
    assert differences(fp(ranking="per-cost"), fp(ranking="auto")) == ["ranking ('per-cost' -> 'auto')"]
    assert differences(fp(ranking="auto"), fp(ranking="auto")) == []


@pytest.mark.parametrize("kwargs, match", [
    ({"cost": "latency"}, "needs unit_costs"),
    ({"cost": "params", "unit_costs": {}}, "needs cost='latency'"),
    ({"cost": "latency", "unit_costs": {"nope": 1.0}}, "lacks a positive cost"),
])
def test_latency_cost_needs_its_table(kwargs, match):
    masks = upop.attach_masks(FAMILIES["clip"][0]())
    with pytest.raises(ConfigError, match=match):
        UPopSearch(masks, ratio=0.5, total_steps=4, interval=2, **kwargs)


@pytest.mark.parametrize("setting, units, allocation, used", [
    (1, [64, 3072], "unified", 1),            # as set
    (16, [64, 3072], "unified", 16),
    ("auto", [64, 3072], "unified", ROUND_TO_AUTO),  # CLIP-B/16: 8
    ("auto", [16, 192], "unified", 4),        # the demo model: 16-unit attention keeps 4 choices
    ("auto", [8, 64], "unified", 2),
    ("auto", [3, 64], "unified", 1),
    ("auto", [64, 3072], "uniform", 1),       # the uniform ablation does not round
])
def test_round_to_auto(setting, units, allocation, used):
    class G:
        def __init__(self, n):
            self.num_units = n

    n, why = resolve_round_to(setting, [G(u) for u in units], "cpu", allocation)
    assert n == used and why


def test_compress_with_latency_cost_and_auto_widths(tmp_path):
    """A whole run: the table is built and cached in the run folder, reused on resume, the budget is
    met in measured time, and every kept width is a multiple of the auto round_to."""
    root = clip_world(tmp_path / "world")
    model, processor = upop.load_model(root / "model")
    groups = upop.find_groups(model)
    config = upop.UPopConfig(search_epochs=1, retrain_epochs=0, batch_size=8, latency_time=0.02, checkpoint_every=1,
                             cost="latency", ratio=0.4)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        upop.compress(model, "retrieval", root / "data", processor=processor, config=config, out_dir=out,
                      progress=False, stop_after=2)
    table = json.loads((out / "state" / TABLE_FILE).read_text())
    assert set(table["per_unit_ms"]) == {g.name for g in groups}
    model, processor = upop.load_model(root / "model")
    result = upop.compress(model, "retrieval", root / "data", processor=processor, config=config, out_dir=out,
                           progress=False, resume=True)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["reused"] for r in records if r.get("phase") == "latency-table"] == [False, True]
    costs = table["per_unit_ms"]
    n, _ = resolve_round_to("auto", groups)
    assert result.report["round_to"]["used"] == n > 1
    plan = result.plan
    removed = sum(costs[k] * (p.dense_units - len(p.kept)) for k, p in plan.groups.items())
    total = sum(costs[k] * p.dense_units for k, p in plan.groups.items())
    assert plan.achieved_ratio["latency"] == pytest.approx(removed / total)
    assert 0.4 <= result.report["achieved_ratio"] == plan.achieved_ratio["latency"]
    for p in plan.groups.values():
        assert len(p.kept) % n == 0 or len(p.kept) == p.dense_units


#: registered tiny models with a unit layout the latency table does not time (decoder LLMs)
UNTIMEABLE = [name for name in upop.arch.TINY
              if any(g.grouped or g.masked for g in upop.find_groups(upop.models.folders.make_model(name)))]


@pytest.mark.parametrize("name", UNTIMEABLE)
def test_layouts_the_table_cannot_time_are_refused(name, tmp_path):
    """Rotary pairs, grouped-query heads and gated MLPs are refused in one line, not timed as plain
    attention and MLPs (which would give wrong unit times silently)."""
    model = upop.models.folders.make_model(name)
    groups = upop.find_groups(model)
    for call in (lambda: measure_table(model, groups, 1, "cpu"),
                 lambda: load_or_measure(tmp_path / TABLE_FILE, model, groups, 1, "cpu")):
        with pytest.raises(ConfigError, match="cost='latency' cannot time group") as info:
            call()
        assert "\n" not in str(info.value)
    assert not (tmp_path / TABLE_FILE).exists()
