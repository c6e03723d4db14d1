"""Scores, rankings and allocations of the search are registries of small classes: every registered
one works, one registered at test time is accepted everywhere by that act alone, and an unknown name
is a one-line ConfigError listing the registered ones."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import upop
from upop.errors import ConfigError
from upop.search import allocations, rankings, scores
from upop.search.allocations import ALLOCATION_REGISTRY, ALLOCATIONS, Allocation, get_allocation
from upop.search.mask_search import UPopSearch
from upop.search.rankings import RANKING_REGISTRY, resolve_ranking
from upop.search.scores import SCORE_REGISTRY, SCORES, Score, get_score, register_score
from upop.search.settings import resolve_round_to

from ._families import FAMILIES


def _masks():
    return upop.attach_masks(FAMILIES["clip"][0]())


def _set_grads(masks, seed: int) -> dict[str, torch.Tensor]:
    """Random mask values in (0, 1] and gradients of both signs; returns the gradients."""
    g = torch.Generator().manual_seed(seed)
    grads = {}
    with torch.no_grad():
        for name, p in masks.items():
            p.copy_(torch.rand(p.shape, generator=g) * 0.9 + 0.1)
            grads[name] = torch.randn(p.shape, generator=g)
            p.grad = grads[name].clone()
    return grads


@pytest.mark.parametrize("name", list(SCORE_REGISTRY))
def test_every_score_accumulates_its_term(name):
    """``accumulate_grads`` adds exactly ``term(grad, mask)``, finite and of the mask's shape, and a score
    is ``signed`` exactly when its term comes out negative for gradients of both signs."""
    masks = _masks()
    score = get_score(name)
    negative = False
    for seed in range(3):
        for g in masks.groups:
            masks.grad_sum[g.name].zero_()
        grads = _set_grads(masks, seed)
        values = {n: p.detach().clone() for n, p in masks.items()}
        assert bool(masks.accumulate_grads(score=name))
        for g in masks.groups:
            got = masks.grad_sum[g.name]
            assert got.shape == masks[g.name].shape and got.dtype == torch.float64
            assert torch.isfinite(got).all()
            expected = score.term(grads[g.name].to(torch.float64), values[g.name].to(torch.float64))
            assert torch.equal(got, expected), g.name
            negative |= bool((got < 0).any())
    assert negative == score.signed, f"{name}: signed={score.signed}, negative terms: {negative}"
    assert isinstance(score.summary, str) and score.summary and "\n" not in score.summary


@pytest.mark.parametrize("name", list(SCORE_REGISTRY))
def test_every_score_passed_as_an_object_adds_the_same(name):
    a, b = _masks(), _masks()
    _set_grads(a, 0)
    _set_grads(b, 0)
    a.accumulate_grads(score=name)
    b.accumulate_grads(score=get_score(name))
    assert all(torch.equal(a.grad_sum[n], b.grad_sum[n]) for n in a.keys())


@pytest.mark.parametrize("ranking", list(RANKING_REGISTRY))
@pytest.mark.parametrize("score", list(SCORE_REGISTRY))
def test_a_ranking_needing_an_importance_refuses_a_signed_score(score, ranking):
    refused = RANKING_REGISTRY[ranking].needs_importance and SCORE_REGISTRY[score].signed
    masks = _masks()
    make = lambda: UPopSearch(masks, ratio=0.5, total_steps=4, interval=2, score=score, ranking=ranking)
    if refused:
        with pytest.raises(ConfigError, match=f"ranking='{ranking}' needs score") as info:
            make()
        assert "\n" not in str(info.value)
        assert all(f"'{n}'" in str(info.value) for n, cls in SCORE_REGISTRY.items() if not cls.signed)
    else:
        search = make()
        _set_grads(masks, 1)
        search.step(0)
        priority = search.scores()
        assert priority.shape == (sum(g.num_units for g in masks.groups),) and torch.isfinite(priority).all()
    assert resolve_ranking(score, None, "params") == "score"  # per-cost is never the default of a params budget


@pytest.mark.parametrize("name", list(ALLOCATION_REGISTRY))
@pytest.mark.parametrize("round_to", [1, 4])
def test_every_allocation_selects_within_the_budget(name, round_to):
    """Every registered allocation cuts at least the budget and keeps a unit in every group; one that does
    not round refuses ``round_to > 1`` and resolves ``auto`` to 1."""
    masks = _masks()
    make = lambda: UPopSearch(masks, ratio=0.4, total_steps=1, interval=1, method="one-shot", allocation=name,
                              round_to=round_to)
    if round_to > 1 and not get_allocation(name).rounds:
        with pytest.raises(ConfigError, match=f"{name} allocation does not round"):
            make()
        assert resolve_round_to("auto", masks.groups, allocation=name)[0] == 1
        return
    search = make()
    _set_grads(masks, 2)
    search.step(0)
    assert search.done and search.history[-1].removed >= 0.4 - 1e-9
    for g in masks.groups:
        kept = int((masks[g.name] == 1).sum())
        assert kept >= 1 and int((masks[g.name] == 0).sum()) + kept == g.num_units
        if round_to > 1 and g.num_units >= round_to:
            assert kept % round_to == 0


class _Constant(Score):
    """A score found nowhere else: every step adds 7 to every unit."""

    name = "test-constant"
    summary = "adds 7 per step"

    def term(self, grad, mask):
        return torch.full_like(grad, 7.0)


def test_a_score_registered_at_test_time_is_accepted_everywhere(monkeypatch):
    assert _Constant.name not in SCORES
    monkeypatch.setitem(SCORE_REGISTRY, _Constant.name, _Constant)
    assert _Constant.name in SCORES and SCORES[-1] == _Constant.name  # the names are read live
    config = upop.UPopConfig(score=_Constant.name)  # validation reads the registry
    assert config.score == _Constant.name
    from upop.cli.parser import build_parser

    args = build_parser().parse_args(["compress", "--model", "m", "--task", "retrieval", "--data", "d",
                                      "--out", "o", "--score", _Constant.name])
    assert args.score == _Constant.name
    masks = _masks()
    search = UPopSearch(masks, ratio=0.5, total_steps=4, interval=2, cost="params", score=_Constant.name)
    assert search.ranking == "score" and search.settings()["score"] == _Constant.name
    for step in range(2):
        _set_grads(masks, step)
        search.step(step)
    assert all(torch.equal(masks.grad_sum[n], torch.full_like(masks.grad_sum[n], 14.0)) for n in masks.keys())
    monkeypatch.undo()
    assert _Constant.name not in SCORES
    with pytest.raises(ConfigError, match="score"):
        upop.UPopConfig(score=_Constant.name)


class _KeepAll(Allocation):
    """An allocation found nowhere else: it prunes nothing."""

    name = "test-keep-all"
    summary = "prunes nothing"
    rounds = False

    def select(self, costs, scores, ratio, round_to):
        return torch.zeros(scores.numel(), dtype=torch.bool)


def test_an_allocation_registered_at_test_time_is_accepted_everywhere(monkeypatch):
    monkeypatch.setattr(allocations, "ALLOCATION_REGISTRY", {**ALLOCATION_REGISTRY, _KeepAll.name: _KeepAll})
    assert _KeepAll.name in ALLOCATIONS
    assert upop.UPopConfig(allocation=_KeepAll.name).allocation == _KeepAll.name
    masks = _masks()
    search = UPopSearch(masks, ratio=0.5, total_steps=1, interval=1, method="one-shot", allocation=_KeepAll.name)
    _set_grads(masks, 0)
    search.step(0)
    assert search.history[-1].selected == 0 and all(bool((p == 1).all()) for _, p in masks.items())
    assert resolve_round_to("auto", masks.groups, allocation=_KeepAll.name)[0] == 1


@pytest.mark.parametrize("module, what, get", [
    (scores, "score", scores.get_score),
    (rankings, "ranking", rankings.get_ranking),
    (allocations, "allocation", allocations.get_allocation),
])
@pytest.mark.parametrize("bad", ["nope", "", ["gradient"], None])
def test_an_unknown_name_is_a_one_line_error_listing_the_registered_ones(module, what, get, bad):
    registry = getattr(module, f"{what.upper()}_REGISTRY")
    with pytest.raises(ConfigError) as info:
        get(bad)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{what} must be one of ")
    assert all(name in message for name in registry)
    if what == "ranking" and bad is None:
        return  # ranking=None is the search's default (auto)
    masks = _masks()
    with pytest.raises(ConfigError, match=f"^{what} must be one of "):
        UPopSearch(masks, ratio=0.5, total_steps=4, interval=2, **{what: bad})


def test_a_name_is_registered_once(monkeypatch):
    monkeypatch.setattr(scores, "SCORE_REGISTRY", dict(SCORE_REGISTRY))
    assert register_score(_Constant) is _Constant and register_score(_Constant) is _Constant  # same class: no-op
    clash = type("Clash", (Score,), {"name": _Constant.name})
    with pytest.raises(ConfigError, match="already registered"):
        register_score(clash)
    with pytest.raises(ConfigError, match="non-empty str attribute 'name'"):
        register_score(type("Nameless", (Score,), {}))
    with pytest.raises(TypeError):
        register_score(object)  # type: ignore[arg-type]


def test_the_names_load_no_torch():
    """The CLI's parser shows these names as choices; reading them must not import torch."""
    code = ("import sys; from upop.search.settings import SCORES, RANKINGS, ALLOCATIONS; "
            "print(len(SCORES) > 2, len(RANKINGS) > 1, len(ALLOCATIONS) > 1, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True", "True", "False"], out
