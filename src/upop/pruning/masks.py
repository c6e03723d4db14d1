"""Unit masks (METHOD §1) and explicit mask-gradient accumulation (METHOD §7).

A mask is a 1-D parameter per group, initialised to 1. It multiplies the outputs of the group's
producers (channel ``j`` of every head of Q, K and V; MLP neuron ``i`` after fc1, before the
activation): the producing Linear layers run a masked forward (:class:`_MaskedLinear`) that
costs no more memory than the plain Linear and works with fused attention kernels. Masks live in :class:`Masks`, not in the model, so
``model.parameters()`` (and hence any optimizer built from it) never contains them.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from upop.arch import ArchSpec, find_groups, get_spec
from upop.errors import ConfigError, show
from upop.arch.groups import Group
from upop.search.scores import GradientScore, Score, get_score


class Masks(nn.Module):
    """Masks of every group of one model, with their accumulated gradients.

    ``masks[name]`` is the mask parameter of group ``name``; ``masks.groups`` the groups in model
    order; ``masks.grad_sum[name]`` the sum of that mask's gradients over all accumulated steps,
    in float64 on the masks' device (``masks.to(device)`` moves both).
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
            g.name: torch.zeros(g.num_units, dtype=torch.float64, device=p.device)
            for g, p in zip(self.groups, self._params)
        }
        # one masked forward per producer; the two groups of a pair (granularity "both") share it
        wrapped: dict[str, _MaskedForward] = {}
        for group, mask in zip(self.groups, self._params):
            for name in group.mask_producers:
                if name in wrapped:
                    wrapped[name].add(mask, group)
                else:
                    wrapped[name] = _MaskedForward(model.get_submodule(name), mask, group, name)
        self._handles = list(wrapped.values())

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
    def accumulate_grads(
        self, average_across_processes: bool = True, grad_scale: float | torch.Tensor = 1.0,
        score: str | Score = GradientScore.name,
    ) -> torch.Tensor:
        """Add every mask's current gradient to ``grad_sum`` and clear the gradient.

        Gradients are accumulated in float64, whatever the training precision, so the score is a
        true sum over steps (the reference code's mixed-precision path reset it every step).
        ``grad_scale`` is the loss scale of fp16 training (the gradients are divided by it); a
        tensor (a scaler's scale on the device) is used where it lies, without reading it.
        Across processes the gradients are averaged first, so every process holds the same sums.

        ``score`` (a :class:`upop.search.scores.Score` or a registered name) decides what is added
        per unit: its ``term(gradient, mask)``, e.g. the gradient itself (``"gradient"``, the paper),
        ``|gradient x mask|`` (``"taylor"``) or the squared gradient (``"fisher"``).

        Returns a 0-dim bool tensor on the masks' device: False if any gradient was not finite,
        in which case nothing of this step is added. Nothing here reads a value back to the host,
        so a training step is not stalled waiting for the device; callers that must act on a
        non-finite step read the flag when they need to (see :meth:`UPopSearch.step`).
        """
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        flat = torch.cat([g.reshape(-1).to(torch.float64) for g in grads])
        flat = flat / (grad_scale.to(flat.device, torch.float64) if torch.is_tensor(grad_scale) else float(grad_scale))
        if average_across_processes and _world_size() > 1:
            torch.distributed.all_reduce(flat)
            flat /= _world_size()
        for p in self._params:
            p.grad = None
        scorer = get_score(score) if isinstance(score, str) else score
        term = scorer.term(flat, torch.cat([p.detach().reshape(-1).to(torch.float64) for p in self._params]))
        if term.shape != flat.shape:
            raise ConfigError(f"score {show(scorer.name)} returned a term of shape {tuple(term.shape)}; the masks "
                              f"need {tuple(flat.shape)}")
        flat = term
        finite = torch.isfinite(flat).all()
        flat = torch.where(finite, flat, 0.0)
        for group, part in zip(self.groups, flat.split([g.num_units for g in self.groups])):
            self.grad_sum[group.name] += part
        return finite

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        """``masks.to(device)`` (and ``.cuda()``, ``.cpu()``) moves the gradient sums along with the
        masks, keeping them in float64, so accumulating never copies between devices."""
        super()._apply(fn, recurse)
        for group, p in zip(self.groups, self._params):
            self.grad_sum[group.name] = self.grad_sum[group.name].to(p.device)
        return self

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
            self.grad_sum[group.name] = sums[group.name].to(p.device, torch.float64).clone()


_HALF = (torch.float16, torch.bfloat16)
_DOT_CHUNK = 1 << 20  # elements of a float32 temporary in _row_dots


def _row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_j a_ij * b_ij`` per row ``i``: a unit's mask gradient. In half precision the sums are
    formed in float32 (fp16 overflows where the weight gradient does not, e.g. under a large loss
    scale, and bf16 keeps 8 bits of mantissa), a few rows at a time so no weight-sized float32
    temporary exists; in float32 / float64 one batched product, as before."""
    if a.dtype not in _HALF:
        return (a.unsqueeze(1) @ b.unsqueeze(2)).view(-1)
    rows = max(1, _DOT_CHUNK // max(1, a.shape[1]))
    return torch.cat([(a[i:i + rows].float().unsqueeze(1) @ b[i:i + rows].float().unsqueeze(2)).view(-1)
                      for i in range(0, a.shape[0], rows)])


class _MaskedLinear(torch.autograd.Function):
    """``y = (x W^T + b) * s`` with the memory of a plain Linear.

    Autograd of ``linear(x) * s`` would keep the unmasked output alive for ``dL/ds``. Here
    ``dL/ds_j = sum_i W_ji G_ji + b_j sum(g_j)`` with ``G = g^T x``, the matrix the weight
    gradient needs anyway: only ``x`` is saved, as by ``nn.Linear``, and no extra matmul runs.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scale):
        # scaled in place: no temporary (neither a scaled weight nor a second output); the
        # product costs 1 / (2 x in_features) of the matmul's FLOPs
        out = torch.nn.functional.linear(x, weight, bias)
        out.mul_(scale.to(out.dtype))
        ctx.save_for_backward(x, weight, bias, scale)
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight, bias, scale = ctx.saved_tensors
        dtype = torch.promote_types(g.dtype, x.dtype)
        g2 = g.reshape(-1, g.shape[-1]).to(dtype)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        s = scale.to(dtype)
        w = weight.to(dtype)
        grad_x = grad_w = grad_b = grad_s = None
        if ctx.needs_input_grad[0]:
            # (g * s) W == g (s W): scale whichever of the two is smaller
            scaled = g2 @ (w * s.unsqueeze(1)) if g2.shape[0] > w.shape[1] else (g2 * s) @ w
            grad_x = scaled.reshape(x.shape).to(x.dtype)
        g_sum = g2.sum(0) if bias is not None else None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            big_g = g2.t() @ x2  # dL/d(x W^T) summed over tokens, before the mask
            # no weight-sized temporaries beyond big_g (each one is a fresh allocation per layer
            # and step): the row dots as a batched product, the weight gradient scaled in place
            if ctx.needs_input_grad[3]:
                grad_s = _row_dots(big_g, w)
                if bias is not None:
                    grad_s = grad_s + g2.sum(0, dtype=grad_s.dtype) * bias.to(grad_s.dtype)
                grad_s = grad_s.to(scale.dtype)
            if ctx.needs_input_grad[1]:
                grad_w = big_g.mul_(s.unsqueeze(1)).to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_b = (g_sum * s).to(bias.dtype)
        return grad_x, grad_w, grad_b, grad_s


class _MaskedForward:
    """Replaces a Linear's forward by the masked one; ``remove()`` restores the class forward.

    The group's unit mask becomes one scale per output feature by :meth:`Group.expand_mask`
    (channels: repeated once per head; whole heads: each value repeated ``head_dim`` times). A
    producer of a pair (granularity ``"both"``) has both masks: row ``(h, j)`` is scaled by
    ``head_mask[h] * channel_mask[j]``."""

    def __init__(self, module: nn.Linear, mask: nn.Parameter, group: Group, name: str = ""):
        self.module, self.mask, self.group, self.name = module, mask, group, name
        self.extra: list[tuple[nn.Parameter, Group]] = []
        module.forward = self.forward  # instance attribute: shadows nn.Linear.forward

    def add(self, mask: nn.Parameter, group: Group) -> None:
        """A second mask on the same rows (the other group of a pair), multiplied in."""
        self.extra.append((mask, group))

    def forward(self, x):
        lin = self.module
        scale = self.group.expand_mask(self.mask, self.name)
        for mask, group in self.extra:
            scale = scale * group.expand_mask(mask, self.name)
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            with torch.autocast(x.device.type, enabled=False):
                bias = lin.bias.to(dtype) if lin.bias is not None else None
                return _MaskedLinear.apply(x.to(dtype), lin.weight.to(dtype), bias, scale)
        return _MaskedLinear.apply(x, lin.weight, lin.bias, scale)

    def remove(self) -> None:
        if "forward" in vars(self.module):
            del self.module.forward


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def refuse_pruned(model: nn.Module) -> None:
    """Refuse to search or prune a model upop already pruned (one that carries a plan).

    Plans do not compose: a second plan would count the pruned widths as dense, while the folder
    keeps the dense ``config.json`` the first plan is replayed on, so the result could not be
    loaded. Refused before anything is done; compress the dense model once with the ratio wanted.
    """
    plan = getattr(model, "upop_plan", None)
    if plan is not None:
        base = f" (dense model: {show(plan.base_model)})" if plan.base_model else ""
        raise ConfigError(f"this {type(model).__name__} is already compressed by upop{base}; compressing a compressed "
                          "model again is not supported (plans do not compose): compress the dense model once, with "
                          "the --ratio you want in the end")


def attach_masks(
    model: nn.Module, groups: list[Group] | None = None, spec: ArchSpec | None = None
) -> Masks:
    """Attach a mask (all ones) to every prunable group of ``model`` and return them.

    The masks are not parameters of ``model``. Call :func:`upop.prune` to slice the units whose
    mask is 0 (it also removes the masks), or ``masks.remove()`` to drop them.
    """
    refuse_pruned(model)
    spec = spec or get_spec(model)
    groups = groups if groups is not None else find_groups(model, spec)
    existing = getattr(model, "_upop_masks", None)
    if existing is not None and existing._handles:
        raise ValueError("this model already has upop masks attached; prune it or call masks.remove() first")
    masks = Masks(model, groups, spec)
    object.__setattr__(model, "_upop_masks", masks)
    return masks
