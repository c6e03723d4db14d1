"""Unit masks (METHOD §1) and explicit mask-gradient accumulation (METHOD §7).

A mask is a 1-D parameter per group, initialised to 1. It multiplies the outputs of the group's
producers (channel ``j`` of every head of Q, K and V; MLP neuron ``i`` after fc1, before the
activation) through forward hooks, which is the same as multiplying the producing weight rows and
works with fused kernels. Masks live in :class:`Masks`, not in the model, so
``model.parameters()`` (and hence any optimizer built from it) never contains them.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from .arch import ArchSpec, find_groups, get_spec
from .groups import Group


class Masks(nn.Module):
    """Masks of every group of one model, with their accumulated gradients.

    ``masks[name]`` is the mask parameter of group ``name``; ``masks.groups`` the groups in model
    order; ``masks.grad_sum[name]`` the sum of that mask's gradients over all accumulated steps.
    """

    def __init__(self, model: nn.Module, groups: list[Group], spec: ArchSpec):
        super().__init__()
        self.groups = list(groups)
        self.spec = spec
        self._params = nn.ParameterList(
            [nn.Parameter(torch.ones(g.num_units, device=_device(model))) for g in self.groups]
        )
        self._index = {g.name: i for i, g in enumerate(self.groups)}
        self.grad_sum: dict[str, torch.Tensor] = {
            g.name: torch.zeros(g.num_units, dtype=torch.float64, device=_device(model)) for g in self.groups
        }
        self._handles = []
        for group, mask in zip(self.groups, self._params):
            for name in group.producers:
                hook = _make_hook(mask, group.mask_expansion())
                self._handles.append(model.get_submodule(name).register_forward_hook(hook))

    # mapping-like access -------------------------------------------------------------------
    def __getitem__(self, name: str) -> nn.Parameter:
        return self._params[self._index[name]]

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __len__(self) -> int:
        return len(self.groups)

    def keys(self) -> list[str]:
        return [g.name for g in self.groups]

    def items(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((g.name, p) for g, p in zip(self.groups, self._params))

    def group(self, name: str) -> Group:
        return self.groups[self._index[name]]

    # gradients -----------------------------------------------------------------------------
    @torch.no_grad()
    def accumulate_grads(self, average_across_processes: bool = True, grad_scale: float = 1.0) -> bool:
        """Add every mask's current gradient to ``grad_sum`` and clear the gradient.

        Gradients are accumulated in float64, whatever the training precision, so the score is a
        true sum over steps (the reference code's mixed-precision path reset it every step).
        ``grad_scale`` is the loss scale of fp16 training (the gradients are divided by it).
        Across processes the gradients are averaged first, so every process holds the same sums.
        Returns False (and accumulates nothing) if any gradient is not finite.
        """
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        flat = torch.cat([g.reshape(-1).to(torch.float64) for g in grads]) / float(grad_scale)
        if average_across_processes and _world_size() > 1:
            torch.distributed.all_reduce(flat)
            flat /= _world_size()
        for p in self._params:
            p.grad = None
        if not torch.isfinite(flat).all():
            return False
        offset = 0
        for group in self.groups:
            n = group.num_units
            self.grad_sum[group.name] += flat[offset : offset + n].to(self.grad_sum[group.name].device)
            offset += n
        return True

    @torch.no_grad()
    def set_(self, name: str, values: torch.Tensor) -> None:
        self[name].copy_(values)

    def remove(self) -> None:
        """Detach the hooks: the model computes as if it had no masks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # (de)serialisation ---------------------------------------------------------------------
    def state_dict(self, *args, **kwargs):  # type: ignore[override]
        return {
            "values": {g.name: p.detach().cpu().clone() for g, p in zip(self.groups, self._params)},
            "grad_sum": {k: v.detach().cpu().clone() for k, v in self.grad_sum.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state, strict: bool = True):  # type: ignore[override]
        values, sums = state["values"], state["grad_sum"]
        if set(values) != set(self._index) or set(sums) != set(self._index):
            raise ValueError("mask state does not match the model's groups")
        for group, p in zip(self.groups, self._params):
            p.copy_(values[group.name].to(p.device))
            self.grad_sum[group.name] = sums[group.name].to(self.grad_sum[group.name].device, torch.float64).clone()


def _make_hook(mask: nn.Parameter, repeat: int):
    def hook(module, inputs, output):
        scale = mask.repeat(repeat) if repeat > 1 else mask
        return output * scale.to(output.dtype)

    return hook


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def attach_masks(
    model: nn.Module, groups: list[Group] | None = None, spec: ArchSpec | None = None
) -> Masks:
    """Attach a mask (all ones) to every prunable group of ``model`` and return them.

    The masks are not parameters of ``model``. Call :func:`upop.prune` to slice the units whose
    mask is 0 (it also removes the masks), or ``masks.remove()`` to drop them.
    """
    spec = spec or get_spec(model)
    groups = groups if groups is not None else find_groups(model, spec)
    existing = getattr(model, "_upop_masks", None)
    if existing is not None and existing._handles:
        raise ValueError("this model already has upop masks attached; prune it or call masks.remove() first")
    masks = Masks(model, groups, spec)
    object.__setattr__(model, "_upop_masks", masks)
    return masks
