"""The UPop search as a callback on a training loop (METHOD §2-3).

:class:`UPopCallback` holds the masks and the :class:`~upop.search.mask_search.UPopSearch` of one search and
does the UPop part of every step: the sparsity term (added to the loss, or directly to the mask
gradients), the mask gradients taken once per optimizer step and divided by the loss scale, the
selection and projection when due, the search state for checkpoints, and the pruning at the end.
Both loops run it: upop's own (:class:`upop.engine.loop.StepLoop`, used by ``upop compress``) and a
``transformers.Trainer`` (:class:`upop.integrations.transformers.callback.UPopTrainerCallback` wraps it).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from upop.engine.loop import LoopCallback
from upop.pruning.masks import Masks
from upop.pruning.prune import PruningPlan, prune
from upop.search.mask_search import UPopSearch


class UPopCallback(LoopCallback):
    """The search of ``masks`` by ``search`` on a training loop.

    ``grad_scale()`` returns ``(loss scale, scaled)``: the factor the mask gradients carry (fp16
    loss scaling; ``(1.0, False)`` otherwise) and whether a step may be skipped for non-finite
    gradients. ``identical(tensors)``, under several processes, checks that every process holds
    the same masks after an update (logged as ``masks_identical``).
    """

    def __init__(self, masks: Masks, search: UPopSearch,
                 grad_scale: Callable[[], tuple[float, bool]] = lambda: (1.0, False),
                 identical: Callable[[Iterable[torch.Tensor]], bool] | None = None, bar=None):
        self.masks, self.search, self.grad_scale, self.identical, self.bar = masks, search, grad_scale, identical, bar
        self._accumulated: int | None = None  # the step whose gradients to_read accumulated

    # the step ------------------------------------------------------------------------------------
    def extend_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The task loss plus the L1 sparsity term of the masks."""
        return loss + self.search.sparsity_loss()

    def add_sparsity_grad(self, scale: float = 1.0) -> None:
        """Add the sparsity term's gradient to the mask gradients directly, in the loss scale of the
        task gradients (for loops whose loss this callback cannot extend, e.g. a Trainer's): the
        gradient of ``w * |zeta|`` on a live mask is ``w * sign(zeta)``."""
        search = self.search
        for g in self.masks.groups:
            mask = self.masks[g.name]
            extra = torch.sign(mask.detach()) * ((search.w_attn if g.kind == "attention" else search.w_mlp) * scale)
            mask.grad = extra if mask.grad is None else mask.grad + extra

    def to_read(self, step: int) -> torch.Tensor | None:
        """Accumulate this step's mask gradients (device-side only); on an update step, the sums
        the selection reads (:meth:`upop.search.mask_search.UPopSearch.accumulate`)."""
        scale, scaled = self.grad_scale()
        self._accumulated = step
        return self.search.accumulate(step, grad_scale=scale, skip_nonfinite=scaled)

    def after_backward(self, step: int, record: dict, host: torch.Tensor | None = None) -> None:
        """Select and project the masks when due (``host``: the sums :meth:`to_read` asked for, read
        by the loop). A loop that does not call :meth:`to_read` (a Trainer's) gets the whole search
        step here, which reads the sums itself. Raises ``FloatingPointError`` for a non-finite mask
        gradient (that a loss scaler did not skip)."""
        if self._accumulated == step:
            update = self.search.finish(step, host) if host is not None else None
        else:
            scale, scaled = self.grad_scale()
            update = self.search.step(step, grad_scale=scale, skip_nonfinite=scaled)
        self._accumulated = None
        history = self.search.history
        record["p_t"] = update.ratio if update else (history[-1].ratio if history else 0.0)
        if update:
            record["removed"] = update.removed
            if self.identical is not None:
                record["masks_identical"] = self.identical(m for _, m in self.masks.items())

    def after_step(self, step: int, record: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", p_t=f"{record['p_t']:.3f}")

    # state and the end ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The search state (masks, accumulated scores, schedule position) for a checkpoint."""
        return self.search.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.search.load_state_dict(state)

    @property
    def done(self) -> bool:
        return self.search.done

    def prune(self, model: nn.Module, base_model: str = "", settings: dict | None = None) -> PruningPlan:
        """Slice the units whose mask is 0 out of ``model`` (in place) and return the plan, with the
        share of the measured latency removed when the budget was in latency."""
        plan = prune(model, self.masks, base_model=base_model, search={**self.search.settings(), **(settings or {})})
        costs = self.search.unit_costs
        if costs is not None:
            total = sum(costs[name] * gp.dense_units for name, gp in plan.groups.items())
            plan.achieved_ratio["latency"] = sum(costs[name] * (gp.dense_units - len(gp.kept))
                                                 for name, gp in plan.groups.items()) / total
        return plan
