"""Rankings of the UPop search: how accumulated scores become one order over the units of every
group (larger = pruned first), registered by name like the scores (:mod:`upop.search.scores`).

Torch-free at import (the CLI's parser shows :data:`RANKINGS` as choices); torch is imported inside
the methods that compute.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from upop.errors import ConfigError, show
from upop.search.registry import Names, Registry
from upop.search.scores import SCORE_REGISTRY, Score, get_score

if TYPE_CHECKING:
    from torch import Tensor

    from upop.search.selection import CostTable


class Ranking:
    """Turns the accumulated sums into pruning priorities.

    Class attributes: ``name``, ``summary`` and ``needs_importance``: whether it divides the sums by
    costs, which needs an unsigned score (:attr:`upop.search.scores.Score.signed` False).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs_importance: ClassVar[bool] = False

    def priority(self, total: Tensor, score: Score, costs: CostTable, unit_cost: Tensor) -> Tensor:
        """Priorities over all units (larger = pruned first) from the accumulated sums ``total`` of
        ``score``; ``costs`` holds the units' structure kinds, ``unit_cost`` each unit's dense cost
        under the search's budget (float64)."""
        raise NotImplementedError


RANKING_REGISTRY: dict[str, type[Ranking]] = {}
"""Registered rankings by name, in registration order (the first is the paper's)."""

_registry = Registry(Ranking, "ranking", lambda: RANKING_REGISTRY)

RANKINGS = _registry.names
"""The registered ranking names, read live (what ``--ranking`` accepts besides ``auto``)."""

RANKING_SETTINGS = Names(lambda: {"auto": None, **RANKING_REGISTRY})
"""What ``UPopConfig.ranking`` and ``--ranking`` accept: ``"auto"`` or a registered ranking, read live."""


register_ranking = _registry.register
"""Register a :class:`Ranking` subclass under its ``name`` (a decorator; :meth:`Registry.register`)."""

get_ranking = _registry.get
"""A new instance of the ranking registered as a name (:meth:`Registry.get`)."""


@register_ranking
class ScoreRanking(Ranking):
    """The paper's: the priorities standardised per structure type (attention channels, attention
    heads, MLP neurons, all modalities), so the types compete on one scale."""

    name = "score"
    summary = "the scores alone, standardised per structure type (the paper)"

    def priority(self, total: Tensor, score: Score, costs: CostTable, unit_cost: Tensor) -> Tensor:
        import torch

        s = score.priority(total)
        out = torch.empty_like(s)
        for kind in costs.kind.unique().tolist():
            kind_mask = costs.kind == kind
            part = s[kind_mask]
            std = part.std(unbiased=False) if part.numel() > 1 else torch.tensor(0.0, dtype=s.dtype)
            out[kind_mask] = (part - part.mean()) / (std if std > 0 else 1.0)
        return out


@register_ranking
class PerCostRanking(Ranking):
    """Importance per unit of cost, least first: the greedy answer to "remove this much cost for the
    least importance", as latency-aware pruning (HALP) ranks. Not standardised: the importances of an
    unsigned score are already on one scale, the loss change each unit's removal is estimated to cause."""

    name = "per-cost"
    summary = "importance per unit of cost, least first (needs an unsigned score)"
    needs_importance = True

    def priority(self, total: Tensor, score: Score, costs: CostTable, unit_cost: Tensor) -> Tensor:
        import torch

        return score.priority(total.to(torch.float64)) / unit_cost


def resolve_ranking(score: str, ranking: str | None, cost: str) -> str:
    """The ranking a search uses: ``ranking`` as given, checked against ``score``, or for None (the
    config's ``auto``) ``"per-cost"`` with a latency budget and an unsigned score, else ``"score"``.
    A ranking that needs an importance with a signed score is a one-line :class:`ConfigError`."""
    scorer = get_score(score)
    if ranking is None:
        return (PerCostRanking if cost == "latency" and not scorer.signed else ScoreRanking).name
    if get_ranking(ranking).needs_importance and scorer.signed:
        unsigned = " or ".join(show(name) for name, cls in SCORE_REGISTRY.items() if not cls.signed)
        raise ConfigError(f"ranking={show(ranking)} needs score {unsigned} (non-negative importances); the signed "
                          f"{score} score ranks by score alone")
    return ranking
