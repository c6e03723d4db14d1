"""The UPop search (METHOD §2): accumulate mask gradients, score, select, project.

Usage inside any training loop (it must run all ``T`` steps: only the last update sets the masks
to exactly 0 or 1, and :func:`upop.prune` refuses masks in between)::

    search = UPopSearch(masks, ratio=0.5, total_steps=T, interval=50)   # interval < T
    for t in range(T):
        loss = task_loss(model, batch) + search.sparsity_loss()
        loss.backward()
        search.step(t)            # accumulate dL/dzeta; every `interval` steps re-select
        optimizer.step(); optimizer.zero_grad()
    assert search.done
    plan = upop.prune(model, masks)

The state (accumulated scores, step, masks, history) round-trips through ``state_dict()`` /
``load_state_dict()``, so a killed run resumes to the same masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from upop.errors import ConfigError
from upop.arch.groups import Group
from upop.pruning.masks import Masks
from upop.search.allocations import UnifiedAllocation, get_allocation
from upop.search.rankings import ScoreRanking, get_ranking
from upop.search.scores import GradientScore, get_score
from upop.search.settings import (ALLOCATIONS, COSTS, METHODS, RANKINGS, ROUND_TO_AUTO, SCORES,  # noqa: F401
                                  _check_settings, resolve_ranking, resolve_round_to)
from upop.search.selection import CostTable, select_chunks


def ratio_at(ratio: float, step: int, total_steps: int) -> float:
    """``p_t = p * sqrt((1 - cos(pi (t+1) / T)) / 2)``: from ~0 up to exactly ``p`` at ``t = T-1``."""
    if step >= total_steps - 1:
        return ratio
    return ratio * math.sqrt((1.0 - math.cos(math.pi * (step + 1) / total_steps)) / 2.0)


@dataclass
class SearchUpdate:
    """What one update chose: the step, the current ratio and the prune set's cost share."""

    step: int
    ratio: float
    removed: float
    selected: int


def _check_reachable(costs: CostTable, ratio: float, round_to: int, cost: str) -> None:
    """Refuse a ratio that no selection can reach once every group keeps ``round_to`` units."""
    removable = costs.removable(round_to)
    if removable < ratio * costs.total:
        raise ConfigError(
            f"ratio={ratio} cannot be met with round_to={round_to}: groups must keep at least {round_to} units "
            + ("(the head groups of granularity both: 1 head), " if costs.has_pairs else "")
            + f"so at most {removable / costs.total:.3f} of the prunable {cost} can be removed; "
            "lower --ratio or --round-to"
        )


def check_reachable(groups: list[Group], ratio: float, round_to: int, cost: str) -> None:
    """The same check before a run starts, for a params or FLOPs budget (a latency budget's unit
    times are measured later, on the run's device: :class:`UPopSearch` checks it then)."""
    if cost != "latency":
        _check_reachable(CostTable(groups, lambda g: float(g.cost(cost)), lambda g: float(g.linear_cost(cost))),
                         ratio, round_to, cost)


class UPopSearch:
    """Unified, progressive search over every group of ``masks``.

    Args:
        masks: the masks from :func:`upop.attach_masks`.
        ratio: ``p``, the share of the prunable cost to remove, in (0, 1).
        total_steps: ``T``, the number of search steps; the loop must run all of them (see
            :attr:`done`) before :func:`upop.prune`.
        interval: re-select every ``interval`` steps (and at the last step); below ``T`` for
            ``method="upop"``, any value >= 1 for one-shot.
        cost: ``"params"`` (exact parameter counts, default), ``"flops"``, or ``"latency"`` (measured
            milliseconds per unit, given as ``unit_costs``; see :mod:`upop.measure.latency_table`).
        ranking: a name of :data:`upop.search.rankings.RANKINGS`, what orders the units: ``"score"``
            (the paper: the scores alone, standardised per structure type) or ``"per-cost"``
            (importance per unit of cost, least first: the greedy answer to "remove this much time
            for the least importance", as latency-aware pruning (HALP) ranks; needs an unsigned
            score such as ``"taylor"`` or ``"fisher"``, whose importances are non-negative estimates
            of the loss change, comparable across structure types). Default (None): ``"per-cost"``
            with ``cost="latency"`` and an unsigned score, else ``"score"``
            (:func:`upop.search.rankings.resolve_ranking`).
        method: ``"upop"`` (progressive projection) or ``"one-shot"`` (masks stay 1 during the
            search and the final prune set is cut to 0 at the last step).
        w_attn, w_mlp: weights of the L1 sparsity terms on attention and MLP masks.
        round_to: kept widths are multiples of this (for an allocation that rounds).
        allocation: a name of :data:`upop.search.allocations.ALLOCATIONS`: ``"unified"`` (UPop, one
            ranking over every group) or ``"uniform"`` (the same ratio in every group).
        unit_costs: with ``cost="latency"``, the measured cost of one unit of every group.
        score: a name of :data:`upop.search.scores.SCORES`, what each step accumulates per unit:
            ``"gradient"`` (the paper, the default here), ``"taylor"`` or ``"fisher"``.
    """

    def __init__(
        self,
        masks: Masks,
        ratio: float,
        total_steps: int,
        interval: int,
        cost: str = "params",
        method: str = "upop",
        w_attn: float = 6.4e-3,
        w_mlp: float = 2e-4,
        round_to: int = 1,
        allocation: str = UnifiedAllocation.name,
        unit_costs: dict[str, float] | None = None,
        score: str = GradientScore.name,
        ranking: str | None = None,
    ):
        self.scorer = get_score(score)
        self.score = score
        self.ranking = resolve_ranking(score, ranking, cost)
        self.ranker = get_ranking(self.ranking)
        _check_settings(ratio, total_steps, interval, cost, method, allocation, round_to)
        if (cost == "latency") != (unit_costs is not None):
            raise ConfigError("cost='latency' needs unit_costs (the measured time per unit of every group), "
                              "and unit_costs needs cost='latency'")
        if unit_costs is not None:
            missing = [g.name for g in masks.groups if not unit_costs.get(g.name, 0) > 0]
            if missing:
                raise ConfigError(f"unit_costs lacks a positive cost for group {missing[0]}")
        self.unit_costs = dict(unit_costs) if unit_costs is not None else None
        if unit_costs is not None and any(g.pair for g in masks.groups):
            raise ConfigError("cost='latency' times head-dim channels only; granularity 'both' needs cost params "
                              "or flops")
        self.masks = masks
        self.ratio, self.total_steps, self.interval = ratio, total_steps, interval
        self.cost, self.method = cost, method
        self.w_attn, self.w_mlp = w_attn, w_mlp
        self.round_to = round_to
        self.allocation = allocation
        self.allocator = get_allocation(allocation)
        self.step_count = 0
        # device-side bookkeeping of non-finite mask gradients (read only at update steps)
        self._skipped = torch.zeros((), dtype=torch.int64)
        self._first_bad = torch.full((), -1, dtype=torch.int64)
        self.history: list[SearchUpdate] = []
        # exact costs (a pair of granularity "both" counted once, bilinearly; upop.search.selection)
        self._costs = CostTable(masks.groups, self._group_cost,
                                lambda g: float(g.linear_cost(self.cost)) if self.unit_costs is None else 0.0)
        self.total_cost = self._costs.total
        _check_reachable(self._costs, ratio, round_to, cost)

    def _group_cost(self, g: Group) -> float:
        """Cost of one unit of ``g`` under this search's budget."""
        return float(self.unit_costs[g.name]) if self.unit_costs is not None else float(g.cost(self.cost))

    # the loss term ---------------------------------------------------------------------------
    def sparsity_loss(self) -> torch.Tensor:
        """``w_attn * sum|zeta_attn| + w_mlp * sum|zeta_mlp|`` (kept for parity; see METHOD §2); head
        masks are attention masks."""
        terms = [
            (self.w_attn if g.kind == "attention" else self.w_mlp) * self.masks[g.name].abs().sum()
            for g in self.masks.groups
        ]
        return torch.stack(terms).sum()

    # per step --------------------------------------------------------------------------------
    def is_update_step(self, step: int) -> bool:
        return (step + 1) % self.interval == 0 or step == self.total_steps - 1

    def step(
        self, step: int | None = None, grad_scale: float | torch.Tensor = 1.0, skip_nonfinite: bool = False
    ) -> SearchUpdate | None:
        """Call after ``loss.backward()``: accumulate mask gradients; update masks when due.

        ``grad_scale``: the fp16 loss scale, divided out before accumulating (a float, or the
        scaler's scale tensor on the device). A step whose mask gradients are not all finite adds
        nothing to the sums. With ``skip_nonfinite`` (fp16 with a dynamic loss scale, whose
        overflowing steps the scaler skips too) it is counted in :attr:`skipped_steps`; without
        it, it raises ``FloatingPointError`` naming that step, at the latest at the next update
        step (every ``interval`` steps and the last) or :meth:`state_dict`, whichever comes first.
        The check waits for those points because reading the flag back would stall every step
        until the device has finished it; between update steps nothing is read from the device,
        and an update step reads the sums and the flag together, once. A loop that reads other
        values of the step too calls :meth:`accumulate` and :meth:`finish` instead, and reads
        what :meth:`accumulate` returns with them in one transfer (:class:`upop.engine.loop.StepLoop`).
        """
        pending = self.accumulate(step, grad_scale, skip_nonfinite)
        if pending is None:
            return None
        return self.finish(self.step_count - 1, pending.cpu())

    def accumulate(
        self, step: int | None = None, grad_scale: float | torch.Tensor = 1.0, skip_nonfinite: bool = False
    ) -> torch.Tensor | None:
        """The first half of :meth:`step`, with device-side ops only: accumulate this step's mask
        gradients. On an update step, returns what :meth:`finish` needs on the host (one float64
        vector on the device: every unit's sum, in group order, then the first fatal non-finite
        step); else None."""
        step = self.step_count if step is None else step
        finite = self.masks.accumulate_grads(grad_scale=grad_scale, score=self.scorer)
        self._note_nonfinite(finite, step, skip_nonfinite)
        self.step_count = step + 1
        if not self.is_update_step(step):
            return None
        sums = [self.masks.grad_sum[g.name] for g in self.masks.groups]
        return torch.cat([*sums, self._first_bad.to(sums[0].device, torch.float64).reshape(1)])

    def finish(self, step: int, host: torch.Tensor) -> SearchUpdate:
        """The second half of an update step: ``host`` is the host copy of what :meth:`accumulate`
        returned. Raises ``FloatingPointError`` for the first fatal non-finite step (as
        :meth:`_raise_if_nonfinite` does), else selects and projects the masks."""
        bad = int(host[-1])
        if bad >= 0:
            raise FloatingPointError(f"non-finite mask gradient at search step {bad} (found at the update of step {step})")
        return self.update(step, host[:-1])

    def _note_nonfinite(self, finite: torch.Tensor, step: int, skip: bool) -> None:
        """Count a skipped step, or remember the first fatal one, with device-side ops only."""
        if self._skipped.device != finite.device:  # once, after the masks moved to their device
            self._skipped, self._first_bad = self._skipped.to(finite.device), self._first_bad.to(finite.device)
        bad = ~finite
        if skip:
            self._skipped += bad
        else:
            self._first_bad.masked_fill_(bad & (self._first_bad < 0), step)

    def _raise_if_nonfinite(self, checked_at: str) -> None:
        """Raise ``FloatingPointError`` if a step without ``skip_nonfinite`` had non-finite mask
        gradients (reads one number from the device)."""
        bad = int(self._first_bad)
        if bad >= 0:
            raise FloatingPointError(f"non-finite mask gradient at search step {bad} (found at {checked_at})")

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite mask gradients under ``skip_nonfinite`` (reading it waits
        for the device)."""
        return int(self._skipped)

    def scores(self, sums: torch.Tensor | None = None) -> torch.Tensor:
        """Pruning priorities over all units (larger = pruned first), on the CPU: the accumulated
        sums turned by the score (:meth:`upop.search.scores.Score.priority`: the signed gradient sum as
        it is, since a unit whose mask gradient is positive lowers the loss when its mask shrinks;
        importances such as Taylor's and Fisher's negated, the least important first) and ordered by
        the ranking (:mod:`upop.search.rankings`: standardised per structure type (attention
        channels, attention heads, MLP neurons, all modalities), or per unit of cost). ``sums``: the
        accumulated sums already on the CPU (read with the step's other values, :meth:`finish`), else
        they are read here."""
        total = sums if sums is not None else torch.cat([self.masks.grad_sum[g.name] for g in self.masks.groups]).cpu()
        unit_cost = torch.cat([torch.full((g.num_units,), self._group_cost(g), dtype=torch.float64)
                               for g in self.masks.groups])
        return self.ranker.priority(total, self.scorer, self._costs, unit_cost)

    def select(self, ratio: float, sums: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean vector over all units: the prune set for ``ratio`` (largest scores first), chosen
        by the allocation (:mod:`upop.search.allocations`).

        Each group's lowest-scored unit is never a candidate, so every group keeps one unit.
        Units are taken while the exact running cost is below ``ratio * total_cost`` (a unit of a
        pair costs what it removes given the units ranked before it: :mod:`upop.search.selection`).
        With ``round_to = N > 1`` units are taken in chunks so that every group keeps a multiple
        of N units (at least N; whole heads of a pair are not rounded): see :meth:`_select_chunks`.
        ``sums``: as for :meth:`scores`.
        """
        return self.allocator.select(self._costs, self.scores(sums), ratio, self.round_to)

    def _select_chunks(self, score: torch.Tensor, ratio: float) -> torch.Tensor:
        """Selection with kept widths rounded to multiples of ``round_to`` (:func:`upop.search.selection.select_chunks`)."""
        return select_chunks(self._costs, score, ratio, self.round_to)

    @torch.no_grad()
    def update(self, step: int, sums: torch.Tensor | None = None) -> SearchUpdate:
        """Score, select the prune set for ``p_t`` and project the masks (METHOD §2, 1-4); ``sums``:
        the accumulated sums on the CPU, if already read."""
        p_t = ratio_at(self.ratio, step, self.total_steps)
        last = step >= self.total_steps - 1
        chosen = self.select(p_t, sums)
        if self.method == "upop":
            value = 0.0 if last else 1.0 - p_t / self.ratio
            flat = torch.where(chosen, torch.tensor(value, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
        else:  # one-shot: masks stay 1 until the end, then the prune set is cut at once
            flat = torch.where(chosen & last, torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
        first = self.masks[self.masks.groups[0].name]
        values = flat.to(first.device, first.dtype).split([g.num_units for g in self.masks.groups])
        for g, value in zip(self.masks.groups, values):
            self.masks[g.name].copy_(value)
        removed = self._costs.removed(chosen) / self.total_cost
        update = SearchUpdate(step=step, ratio=p_t, removed=removed, selected=int(chosen.sum()))
        self.history.append(update)
        return update

    @property
    def done(self) -> bool:
        """True once all ``total_steps`` steps ran: the masks are then exactly 0 or 1."""
        return self.step_count >= self.total_steps

    # resume ----------------------------------------------------------------------------------
    def settings(self) -> dict:
        return {
            "ratio": self.ratio,
            "total_steps": self.total_steps,
            "interval": self.interval,
            "cost": self.cost,
            "method": self.method,
            "w_attn": self.w_attn,
            "w_mlp": self.w_mlp,
            "round_to": self.round_to,
            "allocation": self.allocation,
            # the paper's score and ranking are left out, as in states and plans saved before they existed
            **({"score": self.score} if self.score != GradientScore.name else {}),
            **({"ranking": self.ranking} if self.ranking != ScoreRanking.name else {}),
            **({"unit_costs": self.unit_costs} if self.unit_costs is not None else {}),
        }

    def state_dict(self) -> dict:
        """Settings, step, history and masks (on the CPU), for :meth:`load_state_dict`.

        Raises ``FloatingPointError`` if a step since the last update had non-finite mask
        gradients without ``skip_nonfinite``, so no checkpoint is taken after such a step.
        """
        self._raise_if_nonfinite("saving the search state")
        return {
            "settings": self.settings(),
            "step_count": self.step_count,
            "skipped_steps": self.skipped_steps,
            "history": [vars(u).copy() for u in self.history],
            "masks": self.masks.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["settings"] != self.settings():
            raise ConfigError(
                f"search state was saved with settings {state['settings']}, this run has {self.settings()}"
            )
        self.step_count = int(state["step_count"])
        self._skipped = torch.tensor(int(state.get("skipped_steps", 0)), device=self._skipped.device)
        self._first_bad = torch.full((), -1, dtype=torch.int64, device=self._first_bad.device)
        self.history = [SearchUpdate(**u) for u in state["history"]]
        self.masks.load_state_dict(state["masks"])
