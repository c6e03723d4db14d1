"""Selection of the prune set (METHOD §2, step 3) with exact costs, for :class:`upop.search.mask_search.UPopSearch`.

Units of every group are ranked together by score and taken, largest first, while the running
cost of what was taken is below the budget. Costs are exact. A unit of an unpaired group (MLP
neurons, or attention units of granularity ``"head-dim"`` or ``"head"``) costs the same whatever
else is taken. The two groups of an attention *pair* (granularity ``"both"``: channels and heads of
one module, :attr:`upop.arch.groups.Group.pair`) share their rows: the module costs
``c x heads x channels`` (``c``: one (head, channel) cell), so a unit's cost is *marginal*, given
what was taken before it in the ranking: a head costs ``c x (channels - channels taken)``, a
channel ``c x (heads - heads taken)``. Summed along the ranking, marginal costs are exactly the
removed cost of the taken set, ``c x (H x D - H' x D')``.

:class:`CostTable` holds the per-unit tables; :func:`select_unified`, :func:`select_chunks` and
:func:`select_uniform` are the three selection rules (plain, ``round_to > 1``, ``allocation="uniform"``).
"""

from __future__ import annotations

from itertools import accumulate
from typing import Callable

import torch

from upop.errors import ConfigError
from upop.arch.groups import Group

#: score standardisation kinds (:attr:`CostTable.kind`)
KIND_CHANNELS, KIND_HEADS, KIND_MLP = 0, 1, 2
_SAFE = 1 - 1e-12  # a budget hit exactly is met, not overshot by one unit through rounding


class CostTable:
    """Per-unit cost tables of the concatenated units of ``groups`` (in order).

    ``unit_cost(group)`` is one unit's cost in the dense model (a pair's cell cost is derived from
    its channel group's unit cost: one channel spans ``head_units`` cells). Attributes (tensors over
    units unless said): ``fixed`` (cost of an unpaired unit; for a paired channel unit the part of
    its cost that does not scale with the heads, ``linear_cost(group)``, e.g. a per-head norm's
    weights, 0 for a paired head unit), ``pair`` (pair
    index or -1), ``is_head`` (a unit of a paired head group), ``kind`` (:data:`KIND_CHANNELS`,
    :data:`KIND_HEADS`, :data:`KIND_MLP`), ``group_of``; per pair: ``cell``, ``heads``, ``dims``;
    ``total``: the exact dense cost (each pair once).
    """

    def __init__(self, groups: list[Group], unit_cost: Callable[[Group], float],
                 linear_cost: Callable[[Group], float] = lambda g: 0.0):
        self.groups = list(groups)
        self.sizes = [g.num_units for g in self.groups]
        self.offsets = [0, *accumulate(self.sizes)][:-1]
        index = {g.name: i for i, g in enumerate(self.groups)}
        pair_of = [-1] * len(self.groups)
        cell, heads, dims = [], [], []
        for i, g in enumerate(self.groups):
            if g.pair and not g.whole_heads:
                partner = index.get(g.pair)
                if partner is None or not self.groups[partner].whole_heads:
                    raise ConfigError(f"group {g.name!r} is paired with {g.pair!r}, which is not among the groups "
                                      "searched; pass both groups of a pair (find_groups(..., granularity='both'))")
                pair_of[i] = pair_of[partner] = len(cell)
                cell.append((unit_cost(g) - linear_cost(g)) / g.head_units)
                heads.append(g.head_units)
                dims.append(g.num_units)
        lone = next((g for g, p in zip(self.groups, pair_of) if g.pair and p < 0), None)
        if lone is not None:
            raise ConfigError(f"group {lone.name!r} is paired with {lone.pair!r}, which is not among the groups "
                              "searched; pass both groups of a pair (find_groups(..., granularity='both'))")
        sizes = torch.tensor(self.sizes)
        self.group_of = torch.repeat_interleave(torch.arange(len(self.groups)), sizes)
        self.pair = torch.tensor(pair_of, dtype=torch.long)[self.group_of]
        self.is_head = torch.tensor([p >= 0 and g.whole_heads for g, p in zip(self.groups, pair_of)])[self.group_of]
        kinds = [KIND_MLP if g.kind == "mlp" else KIND_HEADS if g.whole_heads else KIND_CHANNELS for g in self.groups]
        self.kind = torch.tensor(kinds, dtype=torch.long)[self.group_of]
        def fixed(g: Group, p: int) -> float:
            if p < 0:
                return float(unit_cost(g))
            return 0.0 if g.whole_heads else float(linear_cost(g))

        self.fixed = torch.cat([torch.full((g.num_units,), fixed(g, p), dtype=torch.float64)
                                for g, p in zip(self.groups, pair_of)])
        self.cell = torch.tensor(cell, dtype=torch.float64)
        self.heads = torch.tensor(heads, dtype=torch.long)
        self.dims = torch.tensor(dims, dtype=torch.long)
        self.pair_of_group = pair_of
        self.total = float(self.fixed.sum() + (self.cell * self.heads * self.dims).sum())

    @property
    def has_pairs(self) -> bool:
        return self.cell.numel() > 0

    def chunk_size(self, g: Group, round_to: int) -> int:
        """Units per chunk of ``g``: ``round_to``, except whole heads of a pair (never rounded)."""
        return 1 if g.pair and g.whole_heads else round_to

    def removable(self, round_to: int) -> float:
        """The largest cost a selection can remove: every group keeps ``round_to`` units (a pair: one
        head and ``round_to`` channels; its head units have no ``fixed`` cost)."""
        out = sum(float(self.fixed[o]) * max(0, u - round_to) for o, u in zip(self.offsets, self.sizes))
        kept = torch.clamp(self.dims, max=round_to)
        return out + float((self.cell * (self.heads * self.dims - kept)).sum())

    def removed(self, chosen: torch.Tensor) -> float:
        """Exact cost removed by the boolean unit vector ``chosen``."""
        out = float(self.fixed[chosen].sum())
        if self.has_pairs:
            paired = chosen & (self.pair >= 0)
            n = self.cell.numel()
            heads = torch.bincount(self.pair[paired & self.is_head], minlength=n)
            dims = torch.bincount(self.pair[paired & ~self.is_head], minlength=n)
            out += float((self.cell * (self.heads * self.dims - (self.heads - heads) * (self.dims - dims))).sum())
        return out

    def marginal(self, pair: torch.Tensor, is_head: torch.Tensor, size: torch.Tensor,
                 fixed: torch.Tensor) -> torch.Tensor:
        """Costs of items (units or chunks) taken in the given order: ``fixed`` for an unpaired item;
        for a paired one, ``size`` heads cost ``c x size x (D - channels taken before)`` and ``size``
        channels ``c x size x (H - heads taken before)`` plus their ``fixed`` (the part that does not
        scale with the heads) (vectorised: per pair, a running count)."""
        cost = fixed.to(torch.float64).clone()
        idx = torch.nonzero(pair >= 0).flatten()
        if idx.numel() == 0:
            return cost
        p_sorted, perm = torch.sort(pair[idx], stable=True)  # grouped by pair, in ranking order within
        idx = idx[perm]
        head = is_head[idx]
        n = size[idx].to(torch.long)
        h = torch.where(head, n, 0)
        d = n - h
        h_before, d_before = torch.cumsum(h, 0) - h, torch.cumsum(d, 0) - d
        counts = torch.bincount(p_sorted, minlength=self.cell.numel())
        first = (torch.cumsum(counts, 0) - counts)[p_sorted]  # where each item's pair starts
        h_before, d_before = h_before - h_before[first], d_before - d_before[first]
        left = torch.where(head, self.dims[p_sorted] - d_before, self.heads[p_sorted] - h_before)
        cost[idx] = cost[idx] + self.cell[p_sorted] * n * left
        return cost

    def unit_costs(self, order: torch.Tensor) -> torch.Tensor:
        """:meth:`marginal` of single units ``order`` (unit indices, in ranking order)."""
        return self.marginal(self.pair[order], self.is_head[order], torch.ones_like(order), self.fixed[order])


def _take(cost: torch.Tensor, budget: float) -> torch.Tensor:
    """The prefix of items whose running cost before them is below ``budget``."""
    return (torch.cumsum(cost, 0) - cost) < budget * _SAFE


def select_unified(table: CostTable, score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean vector over all units: largest scores first while the exact running cost is below
    ``ratio`` of the total; each group's lowest-scored unit is never a candidate."""
    n = score.numel()
    candidate = torch.ones(n, dtype=torch.bool)
    for offset, size in zip(table.offsets, table.sizes):
        candidate[offset + int(torch.argmin(score[offset : offset + size]))] = False
    idx = torch.nonzero(candidate).flatten()
    order = idx[torch.sort(score[idx], descending=True, stable=True).indices]
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[order[_take(table.unit_costs(order), ratio * table.total)]] = True
    return chosen


def select_uniform(table: CostTable, score: torch.Tensor, ratio: float) -> torch.Tensor:
    """The non-unified ablation: per group (per module for a pair, its heads and channels ranked
    together) units by score, taken while the exact removed cost is below ``ratio`` of its cost;
    each group keeps one unit."""
    chosen = torch.zeros(score.numel(), dtype=torch.bool)
    blocks: dict[object, list[int]] = {}
    for i, p in enumerate(table.pair_of_group):
        blocks.setdefault(("pair", p) if p >= 0 else i, []).append(i)
    for members in blocks.values():
        parts = []
        for i in members:
            o, u = table.offsets[i], table.sizes[i]
            parts.append(torch.sort(score[o : o + u], descending=True, stable=True).indices[:-1] + o)
        idx = torch.cat(parts)
        order = idx[torch.sort(score[idx], descending=True, stable=True).indices]
        p, first = table.pair_of_group[members[0]], table.offsets[members[0]]
        if p >= 0:
            budget = float(table.cell[p] * table.heads[p] * table.dims[p])
        else:
            budget = float(table.fixed[first : first + table.sizes[members[0]]].sum())
        chosen[order[_take(table.unit_costs(order), ratio * budget)]] = True
    return chosen


def select_chunks(table: CostTable, score: torch.Tensor, ratio: float, round_to: int) -> torch.Tensor:
    """Selection with kept widths rounded to multiples of ``round_to`` (hardware-friendly).

    In each group the units are ordered by score (largest first) and cut into chunks: a first
    chunk of ``num_units % N`` units, then chunks of N, never the last N (whole heads of a pair:
    chunks of one, never the last head). A chunk scores the mean of its units, made non-increasing
    along the group so chunks are taken in order. Chunks of all groups are then ranked together and
    taken while the exact running cost is below the target, as units are when N = 1.
    """
    orders, chunk_of, chunk_groups, scores_by_group = [], [], [], []
    n_chunks = 0
    for gi, (g, offset, u) in enumerate(zip(table.groups, table.offsets, table.sizes)):
        n_round = table.chunk_size(g, round_to)
        removable = u - n_round
        if removable <= 0:
            continue
        order = torch.sort(score[offset : offset + u], descending=True, stable=True).indices[:removable] + offset
        lead = u % n_round
        pos = torch.arange(removable)
        local = (pos + (n_round - lead if lead else 0)) // n_round  # chunk 0 = the lead chunk, if any
        count = int(local[-1]) + 1
        orders.append(order)
        chunk_of.append(local + n_chunks)
        chunk_groups.append(torch.full((count,), gi, dtype=torch.long))
        sums = torch.zeros(count, dtype=torch.float64).index_add_(0, local, score[order].to(torch.float64))
        means = sums / torch.bincount(local, minlength=count)
        scores_by_group.append(torch.cummin(means, 0).values)  # non-increasing: a group's chunks go in order
        n_chunks += count
    chosen = torch.zeros(score.numel(), dtype=torch.bool)
    if not orders:
        return chosen
    order, chunk = torch.cat(orders), torch.cat(chunk_of)
    group = torch.cat(chunk_groups)
    size = torch.bincount(chunk, minlength=n_chunks)
    fixed = torch.zeros(n_chunks, dtype=torch.float64).index_add_(0, chunk, table.fixed[order])
    rank = torch.sort(torch.cat(scores_by_group), descending=True, stable=True).indices
    pair = torch.tensor(table.pair_of_group, dtype=torch.long)[group]
    heads = torch.tensor([g.whole_heads for g in table.groups])[group] & (pair >= 0)
    cost = table.marginal(pair[rank], heads[rank], size[rank], fixed[rank])
    taken = torch.zeros(n_chunks, dtype=torch.bool)
    taken[rank[_take(cost, ratio * table.total)]] = True
    chosen[order[taken[chunk]]] = True
    return chosen
