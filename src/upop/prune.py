"""Physical pruning: slice the kept units out of every group (METHOD §3).

:func:`prune` folds the masks into the weights, slices every unit whose mask is exactly 0 and
returns the :class:`PruningPlan` (kept unit indices per group). :func:`apply_plan` replays a plan
on a freshly built dense model with the same slicing code; that is how
:func:`upop.load_compressed` rebuilds a compressed model before loading its weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .arch import ArchSpec, find_groups, get_spec
from .arch._spec import fold_query_scale
from .errors import CheckpointError
from .groups import Group
from .masks import Masks

FORMAT_VERSION = 1


@dataclass
class GroupPlan:
    """Kept units of one group (indices into the dense group's units, sorted)."""

    kind: str
    modality: str
    layer: int
    dense_units: int
    kept: list[int]


@dataclass
class PruningPlan:
    """What was pruned: per group, the kept units; plus provenance and achieved ratios.

    Serialised as ``upop_plan.json`` (sorted keys, ``format_version``) next to the weights.
    """

    model_class: str
    model_type: str
    spec: str
    groups: dict[str, GroupPlan]
    base_model: str = ""
    achieved_ratio: dict[str, float] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def kept_units(self, name: str) -> int:
        return len(self.groups[name].kept)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "upop_plan.json") -> "PruningPlan":
        if not isinstance(data, dict):
            raise CheckpointError(f"{source}: expected a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(f"{source}: format_version {version!r} is not supported (this upop reads {FORMAT_VERSION})")
        missing = [k for k in ("model_class", "model_type", "spec", "groups") if k not in data]
        if missing:
            raise CheckpointError(f"{source}: missing field(s) {', '.join(missing)}")
        groups = {}
        for name, g in data["groups"].items():
            try:
                groups[name] = GroupPlan(**g)
            except TypeError as exc:
                raise CheckpointError(f"{source}: group {name}: {exc}") from None
        fields = {k: data[k] for k in ("base_model", "achieved_ratio", "search") if k in data}
        return cls(data["model_class"], data["model_type"], data["spec"], groups, **fields)


def removed_cost(groups: list[Group], kept: dict[str, int], kind: str = "params") -> tuple[int, int]:
    """(removed, total) prunable cost of a model with ``kept[name]`` units per group."""
    total = sum(g.cost(kind) * g.num_units for g in groups)
    removed = sum(g.cost(kind) * (g.num_units - kept[g.name]) for g in groups)
    return removed, total


@torch.no_grad()
def prune(model: nn.Module, masks: Masks, base_model: str = "", search: dict | None = None) -> PruningPlan:
    """Slice every unit whose mask is exactly 0, in place; remove the masks; return the plan.

    Mask values other than 0 are folded into the producing weights first, so the pruned model
    computes exactly what the masked model computed (up to float rounding). Every group keeps at
    least one unit: a group whose mask is all zeros is an error.
    """
    spec = masks.spec
    kept: dict[str, list[int]] = {}
    for group in masks.groups:
        mask = masks[group.name]
        idx = torch.nonzero(mask.detach() != 0).flatten().tolist()
        if not idx:
            raise ValueError(f"group {group.name}: every unit is masked to 0; keep at least one")
        kept[group.name] = idx
        _fold_mask(model, group, mask.detach())
    masks.remove()
    object.__setattr__(model, "_upop_masks", None)
    plan = PruningPlan(
        model_class=type(model).__name__,
        model_type=model.config.model_type,
        spec=spec.name,
        groups={
            g.name: GroupPlan(g.kind, g.modality, g.layer, g.num_units, kept[g.name]) for g in masks.groups
        },
        base_model=base_model or getattr(model.config, "_name_or_path", "") or "",
        search=dict(search or {}),
    )
    counts = {name: len(idx) for name, idx in kept.items()}
    plan.achieved_ratio = {
        kind: (lambda r: r[0] / r[1] if r[1] else 0.0)(removed_cost(masks.groups, counts, kind))
        for kind in ("params", "flops")
    }
    apply_plan(model, plan, spec=spec, groups=masks.groups, fold_scale=True)
    return plan


def _fold_mask(model: nn.Module, group: Group, mask: torch.Tensor) -> None:
    if bool((mask == 1).all()):
        return
    scale = mask.repeat(group.mask_expansion())
    for name in group.producers:
        lin = model.get_submodule(name)
        lin.weight.mul_(scale.to(lin.weight.dtype).unsqueeze(1))
        if lin.bias is not None:
            lin.bias.mul_(scale.to(lin.bias.dtype))


@torch.no_grad()
def apply_plan(
    model: nn.Module,
    plan: PruningPlan,
    spec: ArchSpec | None = None,
    groups: list[Group] | None = None,
    fold_scale: bool = False,
) -> None:
    """Slice ``model`` (dense, of the plan's class) to the plan's kept units, in place.

    ``fold_scale`` is True when pruning trained weights (attention classes that derive their
    scale from the head width get ``sqrt(new/dense)`` folded into the query rows) and False when
    shaping a fresh model whose weights are loaded afterwards.
    """
    spec = spec or get_spec(model)
    groups = groups if groups is not None else find_groups(model, spec)
    by_name = {g.name: g for g in groups}
    if set(by_name) != set(plan.groups):
        extra = sorted(set(plan.groups) - set(by_name))
        missing = sorted(set(by_name) - set(plan.groups))
        raise CheckpointError(
            f"plan groups do not match the model: unknown {extra[:3]}, missing {missing[:3]}"
        )
    for name, gplan in plan.groups.items():
        group = by_name[name]
        _check_group_plan(group, gplan)
        _slice_group(model, spec, group, gplan.kept, fold_scale)
    object.__setattr__(model, "upop_plan", plan)


def _check_group_plan(group: Group, gplan: GroupPlan) -> None:
    kept = gplan.kept
    if gplan.dense_units != group.num_units:
        raise CheckpointError(
            f"plan group {group.name}: dense_units {gplan.dense_units} but the model has {group.num_units}"
        )
    if not kept or any(not isinstance(i, int) for i in kept) or kept != sorted(set(kept)):
        raise CheckpointError(f"plan group {group.name}: kept must be a non-empty sorted list of distinct ints")
    if kept[0] < 0 or kept[-1] >= group.num_units:
        raise CheckpointError(
            f"plan group {group.name}: kept index {kept[-1] if kept[-1] >= group.num_units else kept[0]} "
            f"outside [0, {group.num_units})"
        )


def _slice_group(model: nn.Module, spec: ArchSpec, group: Group, kept: list[int], fold_scale: bool) -> None:
    new = len(kept)
    if group.kind == "attention":
        module = model.get_submodule(group.module)
        if spec.swap_class is not None:
            spec.swap_class(module)
    if new == group.num_units:
        return
    rows = group.fused_rows(kept) if group.fused_qkv else group.rows(kept)
    for name in group.producers:
        _slice_linear(model.get_submodule(name), rows, dim=0)
    _slice_linear(model.get_submodule(group.consumer), group.rows(kept), dim=1)
    if group.kind == "attention":
        spec.set_head_dim(module, new, group.num_units, group.num_heads)
        if fold_scale and type(module).__name__ in spec.fold_scale_classes:
            fold_query_scale(model, group, new)


def _slice_linear(lin: nn.Linear, index: torch.Tensor, dim: int) -> None:
    index = index.to(lin.weight.device)
    weight = lin.weight.index_select(dim, index).clone()
    lin.weight = nn.Parameter(weight, requires_grad=lin.weight.requires_grad)
    if dim == 0:
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.index_select(0, index).clone(), requires_grad=lin.bias.requires_grad)
        lin.out_features = weight.shape[0]
    else:
        lin.in_features = weight.shape[1]
