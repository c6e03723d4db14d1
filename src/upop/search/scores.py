"""Unit scores of the UPop search: what each search step adds to a unit's accumulated score.

A score is a small class registered by name, as Torch-Pruning's ``Importance`` classes are. Every
step, :meth:`upop.pruning.masks.Masks.accumulate_grads` adds ``score.term(grad, mask)`` (float64,
one entry per unit of every group) to the masks' ``grad_sum``; at each update
:class:`upop.search.mask_search.UPopSearch` turns the sums into an order with
:meth:`Score.priority` and the ranking (:mod:`upop.search.rankings`). Adding a score is one
subclass decorated with :func:`register_score`; by that alone ``UPopSearch(score=...)``,
``UPopConfig(score=...)``, ``upop compress --score`` and the Trainer callback accept it.

This module imports no torch: the CLI's parser shows :data:`SCORES` as choices, and ``upop --help``
must not load torch. The maths are tensor methods of the arguments.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from upop.search.registry import Registry

if TYPE_CHECKING:
    from torch import Tensor


class Score:
    """What one search step adds to each unit's accumulated score.

    Class attributes: ``name`` (the setting's value), ``summary`` (one line, for docs and help) and
    ``signed``: whether the accumulated values can be negative. Only an unsigned score is an
    importance on one scale across structure types (an estimate of the loss change the unit's
    removal causes), so only an unsigned one may be ranked per unit of cost (``ranking="per-cost"``).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    signed: ClassVar[bool] = False

    def term(self, grad: Tensor, mask: Tensor) -> Tensor:
        """The per-step addition for every unit, from the mask gradients ``grad`` (float64, loss scale
        divided out, averaged across processes) and the current mask values ``mask`` (float64, same
        shape). Must return a tensor of that shape."""
        raise NotImplementedError

    def priority(self, total: Tensor) -> Tensor:
        """The accumulated sums as a pruning priority, larger = pruned first. By default the sums are
        importances, so the least important units go first."""
        return -total


SCORE_REGISTRY: dict[str, type[Score]] = {}
"""Registered scores by name, in registration order (the first is the paper's)."""

_registry = Registry(Score, "score", lambda: SCORE_REGISTRY)

SCORES = _registry.names
"""The registered score names, read live (what ``UPopConfig.score`` and ``--score`` accept)."""

register_score = _registry.register
"""Register a :class:`Score` subclass under its ``name`` (a decorator; :meth:`Registry.register`)."""

get_score = _registry.get
"""A new instance of the score registered as a name (:meth:`Registry.get`: an unknown name is a
one-line :class:`ConfigError` listing the registered ones)."""


@register_score
class GradientScore(Score):
    """The paper's score (METHOD §2): the mask gradient ``dL/dzeta`` itself, summed over steps."""

    name = "gradient"
    summary = "the accumulated mask gradient dL/dzeta (the paper)"
    signed = True

    def term(self, grad: Tensor, mask: Tensor) -> Tensor:
        return grad

    def priority(self, total: Tensor) -> Tensor:
        """As it is: a positive sum means the loss falls as the mask shrinks, so the largest goes first."""
        return total


@register_score
class TaylorScore(Score):
    """``|gradient x mask|``: the first-order Taylor estimate of the loss change when the unit is
    removed (its mask set from its value to 0)."""

    name = "taylor"
    summary = "the accumulated |gradient x mask|, first-order Taylor importance"

    def term(self, grad: Tensor, mask: Tensor) -> Tensor:
        return (grad * mask).abs()


@register_score
class FisherScore(Score):
    """The squared mask gradient (the empirical Fisher information of the mask)."""

    name = "fisher"
    summary = "the accumulated squared mask gradient, empirical Fisher importance"

    def term(self, grad: Tensor, mask: Tensor) -> Tensor:
        return grad * grad
