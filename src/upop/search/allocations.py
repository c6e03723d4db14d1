"""Allocations of the UPop search: how the prune set's budget is shared out over the groups,
registered by name like the scores (:mod:`upop.search.scores`).

Each allocation calls a selection rule of :mod:`upop.search.selection`. This module is torch-free at
import (the CLI's parser shows :data:`ALLOCATIONS` as choices); the selection module, which needs
torch, is imported inside :meth:`Allocation.select`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from upop.search.registry import Registry

if TYPE_CHECKING:
    from torch import Tensor

    from upop.search.selection import CostTable


class Allocation:
    """Chooses the prune set from the units' priorities.

    Class attributes: ``name``, ``summary`` and ``rounds``: whether kept widths follow ``round_to``
    (an allocation that does not round only runs with ``round_to=1``, and ``round_to="auto"``
    resolves to 1 for it).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    rounds: ClassVar[bool] = True

    def select(self, costs: CostTable, scores: Tensor, ratio: float, round_to: int) -> Tensor:
        """Boolean vector over all units of ``costs``: the prune set for ``ratio`` of the cost, larger
        ``scores`` first, every group keeping at least one unit (``round_to`` units when it rounds)."""
        raise NotImplementedError


ALLOCATION_REGISTRY: dict[str, type[Allocation]] = {}
"""Registered allocations by name, in registration order (the first is the paper's)."""

_registry = Registry(Allocation, "allocation", lambda: ALLOCATION_REGISTRY)

ALLOCATIONS = _registry.names
"""The registered allocation names, read live (what ``UPopConfig.allocation`` accepts)."""

register_allocation = _registry.register
"""Register an :class:`Allocation` subclass under its ``name`` (a decorator; :meth:`Registry.register`)."""

get_allocation = _registry.get
"""A new instance of the allocation registered as a name (:meth:`Registry.get`)."""


@register_allocation
class UnifiedAllocation(Allocation):
    """UPop's: one ranking across modalities and layers, so each group's share follows its units'
    scores (:func:`~upop.search.selection.select_unified`; in chunks of ``round_to`` units,
    :func:`~upop.search.selection.select_chunks`, when ``round_to > 1``)."""

    name = "unified"
    summary = "one ranking across modalities and layers (UPop)"

    def select(self, costs: CostTable, scores: Tensor, ratio: float, round_to: int) -> Tensor:
        from upop.search.selection import select_chunks, select_unified

        if round_to > 1:
            return select_chunks(costs, scores, ratio, round_to)
        return select_unified(costs, scores, ratio)


@register_allocation
class UniformAllocation(Allocation):
    """The paper's non-unified ablation: the same ratio of every group's (a pair's: module's) cost
    (:func:`~upop.search.selection.select_uniform`); widths are not rounded."""

    name = "uniform"
    summary = "the same ratio in every layer (the paper's non-unified ablation)"
    rounds = False

    def select(self, costs: CostTable, scores: Tensor, ratio: float, round_to: int) -> Tensor:
        from upop.search.selection import select_uniform

        return select_uniform(costs, scores, ratio)
