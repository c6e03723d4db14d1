"""Physical pruning: slice the kept units out of every group (METHOD §3).

:func:`prune` takes masks that are exactly 0 or 1, slices every unit whose mask is 0 and
returns the :class:`PruningPlan` (kept unit indices per group). :func:`apply_plan` replays a plan
on a freshly built dense model with the same slicing code; that is how
:func:`upop.load_compressed` rebuilds a compressed model before loading its weights.
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from upop.arch import ArchSpec, find_groups, get_spec
from upop.arch._spec import ROPE_PAIRS, fold_query_scale, set_head_count
from upop.errors import CheckpointError, ConfigError, show
from upop.arch.groups import HEADS_SUFFIX, Group, cell_rows, exact_cost
from upop.pruning.masks import Masks, refuse_pruned

FORMAT_VERSION = 1
#: the plan's file in a compressed checkpoint folder, next to ``config.json`` and the weights
PLAN_FILE = "upop_plan.json"
_KINDS = ("attention", "mlp")
#: granularities a plan's group may record (``"head-dim"``, the default, is not written)
_PLAN_GRANULARITIES = ("head-dim", "head")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _checked(data: dict[str, Any], key: str, ok: Callable[[Any], bool], need: str, where: str) -> Any:
    """``data[key]`` if ``ok(value)``, else a one-line CheckpointError showing the (escaped) value."""
    value = data[key]
    if not ok(value):
        raise CheckpointError(f"{where}: {key} is {show(value, 60)}; need {need}")
    return value


def _check_keys(data: Any, required: tuple[str, ...], allowed: tuple[str, ...], where: str, what: str) -> None:
    """``data`` is a JSON object with every ``required`` key and no key outside ``allowed``."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: is {show(data, 60)}; need {what} with {', '.join(required)}")
    missing = [k for k in required if k not in data]
    unknown = sorted(str(k) for k in data if k not in allowed)
    if missing or unknown:
        found = f"missing {', '.join(missing)}" if missing else f"unknown {show(unknown, 80)}"
        raise CheckpointError(f"{where}: {found}; {what} has {', '.join(allowed)}")


@dataclass
class GroupPlan:
    """Kept units of one group (indices into the dense group's units, sorted).

    ``granularity`` is ``"head"`` for an attention group whose units are whole heads (``kept``
    are head indices, ``dense_units`` the dense number of heads); a plan of granularity ``"both"``
    holds, per attention module, its channel group ``<name>`` and its head group
    ``<name>.heads`` (``"head"``), sliced together. The default ``"head-dim"`` is
    not written to JSON, so plans of the paper's granularity are what they always were, and a
    plan without the key (any older plan) reads as ``"head-dim"``.
    """

    kind: str
    modality: str
    layer: int
    dense_units: int
    kept: list[int]
    granularity: str = "head-dim"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.granularity == "head-dim":
            del data["granularity"]
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "GroupPlan":
        """Parse one group of a plan, checking every field's type and range (one-line
        CheckpointError naming the group, the field and its value)."""
        names = tuple(f.name for f in fields(cls))
        _check_keys(data, tuple(n for n in names if n != "granularity"), names, where, "a group")
        kind = _checked(data, "kind", lambda v: v in _KINDS, "'attention' or 'mlp'", where)
        modality = _checked(data, "modality", _is_name, "a non-empty string", where)
        layer = _checked(data, "layer", lambda v: _is_int(v) and v >= 0, "an integer >= 0", where)
        dense = _checked(data, "dense_units", lambda v: _is_int(v) and v >= 1, "an integer >= 1", where)
        kept = _checked(data, "kept", lambda v: isinstance(v, list) and v and all(_is_int(i) for i in v)
                        and all(a < b for a, b in zip(v, v[1:])), "a non-empty sorted list of distinct unit indices",
                        where)
        outside = kept[0] if kept[0] < 0 else kept[-1]
        if outside < 0 or outside >= dense:
            raise CheckpointError(f"{where}: kept index {outside} is outside [0, {dense}) (dense_units {dense})")
        granularity = data.get("granularity", "head-dim")
        if granularity not in _PLAN_GRANULARITIES or (granularity == "head" and kind != "attention"):
            raise CheckpointError(f"{where}: granularity is {show(granularity, 60)}; need 'head-dim' or, for an "
                                  "attention group, 'head'")
        return cls(kind, modality, layer, dense, list(kept), granularity)


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
        data["groups"] = {name: g.to_dict() for name, g in self.groups.items()}
        return data

    @property
    def granularity(self) -> str:
        """``"both"`` when the plan holds pairs (``<name>`` and ``<name>.heads``), ``"head"`` when its
        attention groups are whole heads, else ``"head-dim"``."""
        if _has_pairs(self):
            return "both"
        return "head" if any(g.granularity == "head" for g in self.groups.values()) else "head-dim"

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Any, source: str = "upop_plan.json") -> "PruningPlan":
        """Parse a plan (``upop_plan.json`` or a run's saved state), checking every field's type,
        so a damaged or tampered plan is a one-line CheckpointError rather than a failure later."""
        where = show(source)
        allowed = tuple(f.name for f in fields(cls))
        _check_keys(data, ("format_version", "model_class", "model_type", "spec", "groups"), allowed, where,
                    "a upop plan")
        version = data["format_version"]
        if not _is_int(version) or version != FORMAT_VERSION:
            raise CheckpointError(f"{where}: format_version {show(version, 60)} is not supported "
                                  f"(this upop reads {FORMAT_VERSION})")
        text = {key: _checked(data, key, _is_name, "a non-empty string", where)
                for key in ("model_class", "model_type")}
        text["spec"] = _checked(data, "spec", lambda v: isinstance(v, str), "a string", where)
        groups = _checked(data, "groups", lambda v: isinstance(v, dict) and v and all(_is_name(k) for k in v),
                          "an object of group name -> kept units, with at least one group", where)
        extra = {}
        if "base_model" in data:
            extra["base_model"] = _checked(data, "base_model", lambda v: isinstance(v, str), "a string", where)
        if "achieved_ratio" in data:
            extra["achieved_ratio"] = _checked(
                data, "achieved_ratio", lambda v: isinstance(v, dict)
                and all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in v.values()),
                "an object of cost kind -> number", where)
        if "search" in data:
            extra["search"] = _checked(data, "search", lambda v: isinstance(v, dict), "an object of settings", where)
        parsed = {name: GroupPlan.from_dict(g, f"{where}: group {show(name, 80)}") for name, g in groups.items()}
        return cls(text["model_class"], text["model_type"], text["spec"], parsed, **extra)


def _has_pairs(plan: PruningPlan) -> bool:
    """True when ``plan`` holds head groups ``<name>.heads`` next to their channel group ``<name>``."""
    return any(g.granularity == "head" and name.endswith(HEADS_SUFFIX) and name[: -len(HEADS_SUFFIX)] in plan.groups
               for name, g in plan.groups.items())


def removed_cost(groups: list[Group], kept: dict[str, int], kind: str = "params") -> tuple[float, float]:
    """(removed, total) prunable cost with ``kept[name]`` units per group (exact for pairs: :func:`exact_cost`)."""
    total = exact_cost(groups, None, kind)
    return total - exact_cost(groups, kept, kind), total


@torch.no_grad()
def prune(model: nn.Module, masks: Masks, base_model: str = "", search: dict | None = None) -> PruningPlan:
    """Slice every unit whose mask is 0, in place; remove the masks; return the plan.

    Every mask must be exactly 0 or 1, as the search leaves them after its last step. A value in
    between means the search stopped early (its loop ran fewer than ``total_steps`` steps):
    pruning then would remove less than asked, or nothing, so it is a :class:`ConfigError`.
    All masks are checked before anything changes, so a refused call leaves the model and its
    masks as they were. Every group keeps at least one unit.
    """
    refuse_pruned(model)
    spec = masks.spec
    kept = _kept_units(masks)
    masks.remove()
    object.__setattr__(model, "_upop_masks", None)
    plan = PruningPlan(
        model_class=type(model).__name__,
        model_type=model.config.model_type,
        spec=spec.name,
        groups={
            g.name: GroupPlan(g.kind, g.modality, g.layer, g.num_units, kept[g.name], g.granularity)
            for g in masks.groups
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


def _kept_units(masks: Masks) -> dict[str, list[int]]:
    """Per group, the indices of the units whose mask is 1; refuses masks that are not all 0/1
    and groups masked entirely to 0 (one-line :class:`ConfigError` naming the group)."""
    kept: dict[str, list[int]] = {}
    for group in masks.groups:
        values = masks[group.name].detach().cpu()
        odd = torch.nonzero((values != 0) & (values != 1)).flatten().tolist()
        if odd:
            shown = ", ".join(f"unit {i} = {values[i].item():.4g}" for i in odd[:2])
            raise ConfigError(
                f"group {group.name!r} has masks that are not exactly 0 or 1 ({shown}; {len(odd)} of "
                f"{group.num_units} units), so the search has not finished: run the search to its last step "
                "(UPopSearch.done is True) before prune, or set every mask to 0 or 1"
            )
        kept[group.name] = torch.nonzero(values == 1).flatten().tolist()
        if not kept[group.name]:
            raise ConfigError(f"group {group.name!r}: every unit's mask is 0; a group must keep at least one unit")
    return kept


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
    groups = groups if groups is not None else plan_groups(model, plan, spec)
    by_name = {g.name: g for g in groups}
    if set(by_name) != set(plan.groups):
        extra = sorted(set(plan.groups) - set(by_name))
        missing = sorted(set(by_name) - set(plan.groups))
        raise CheckpointError(
            f"plan groups do not match the model: unknown {extra[:3]}, missing {missing[:3]}"
        )
    for name, gplan in plan.groups.items():
        _check_group_plan(by_name[name], gplan)
    for name, gplan in plan.groups.items():
        if not (group := by_name[name]).pair:
            _slice_group(model, spec, group, gplan.kept, fold_scale)
        elif not group.whole_heads:  # a pair is sliced once, with its channel group
            _slice_pair(model, spec, group, gplan.kept, plan.groups[group.pair].kept, fold_scale)
    _carry_plan(model, plan)


def plan_groups(model: nn.Module, plan: PruningPlan, spec: ArchSpec | None = None) -> list[Group]:
    """The groups of dense ``model``, in model order, each at the granularity the plan records for
    it (a plan of whole heads is replayed on head groups; one without the key on channel groups;
    one with pairs on the groups of granularity ``"both"``)."""
    spec = spec or get_spec(model)
    if _has_pairs(plan):
        return find_groups(model, spec, granularity="both")
    wanted = sorted({g.granularity for g in plan.groups.values()} | {"head-dim"})
    found = {gran: {g.name: g for g in find_groups(model, spec, granularity=gran)} for gran in wanted}
    return [found[plan.groups[name].granularity][name] if name in plan.groups else group
            for name, group in found["head-dim"].items()]


def _carry_plan(model: nn.Module, plan: PruningPlan) -> None:
    """Attach ``plan`` as ``model.upop_plan`` and, for a Hugging Face model, make this model's
    ``save_pretrained`` write a compressed checkpoint (:class:`_SavePretrainedWithPlan`)."""
    object.__setattr__(model, "upop_plan", plan)
    if callable(getattr(type(model), "save_pretrained", None)) and "save_pretrained" not in vars(model):
        object.__setattr__(model, "save_pretrained", _SavePretrainedWithPlan(model))


class _SavePretrainedWithPlan:
    """``save_pretrained`` of a pruned model (what ``Trainer.save_model`` calls): the class's own,
    plus ``upop_plan.json`` in the folder, and the weights under the model's own parameter names
    (``save_original_format=False``: transformers would otherwise rename some, e.g. ViT's
    ``layers.N.attention.q_proj`` to ``encoder.layer.N.attention.attention.query``), so the folder
    is the one :func:`upop.save_compressed` writes and :func:`upop.load_compressed` reads,
    including the Hub files (``modeling_upop.py``, ``auto_map``: :mod:`upop.checkpoint.hub`).
    The weights are the safetensors variant ``upop`` (``model.upop.safetensors``, or its shards:
    a dense class cannot load them); another ``variant`` is refused, and weights under the dense
    name that an earlier save left in the folder are deleted, so the folder holds one set.

    An object rather than a bound function so that the model still pickles and deep-copies."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, save_directory, *args, **kwargs):
        from upop.checkpoint.hub import VARIANT

        model = self.model
        save = type(model).save_pretrained
        params = inspect.signature(save).parameters
        positional = [n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD][2:]  # after self, folder
        if len(args) <= len(positional):  # every argument by name (variant, push_to_hub... may come by position)
            kwargs.update(zip(positional, args))
            args = ()
        if "save_original_format" in params:
            kwargs.setdefault("save_original_format", False)
        if kwargs.get("variant") not in (None, VARIANT):
            raise ConfigError(f"variant {show(kwargs['variant'])} is not accepted for a compressed model: its weights "
                              f"are always the variant {VARIANT!r} (model.{VARIANT}.safetensors); omit variant")
        if "variant" in params:
            kwargs["variant"] = VARIANT
        main = args[0] if args else kwargs.get("is_main_process", True)
        on_this_rank = getattr(model, "should_save_on_this_rank", lambda is_main: is_main)(main)
        folder = Path(save_directory)
        writes = on_this_rank and not folder.is_file()  # a file: transformers reports it and writes nothing
        # push_to_hub=True would upload only what transformers itself wrote during the call: save
        # here, then push with push_to_hub (which saves into a fresh folder, through this wrapper)
        push = bool(kwargs.pop("push_to_hub", False))
        hub_args = {k: kwargs.pop(k) for k in _PUSH_ARGS if k in kwargs}
        if writes:
            from upop.checkpoint.hub import refuse_hooks

            refuse_hooks(model)  # before anything is written
            folder.mkdir(parents=True, exist_ok=True)
            (folder / PLAN_FILE).write_text(model.upop_plan.to_json())
        result = save(model, save_directory, *args, **kwargs)
        if writes and (folder / "config.json").is_file():
            from upop.checkpoint.hub import write_hub_files

            from upop.checkpoint.card import write_model_card

            write_hub_files(model, folder)  # modeling_upop.py + auto_map, after transformers wrote config.json
            write_model_card(folder, model.upop_plan)  # README.md, unless the folder has a card of its own
            _drop_dense_weights(folder)
        if push and writes:
            repo_id = hub_args.pop("repo_id", folder.name)
            hub_args.setdefault("token", kwargs.get("token"))
            return model.push_to_hub(repo_id, max_shard_size=kwargs.get("max_shard_size", "50GB"), **hub_args)
        return result


def _drop_dense_weights(folder: Path) -> None:
    """Delete weights under the dense name (``model.safetensors``, or the index and the
    ``model-NNNNN-of-NNNNN.safetensors`` shards it names) that an earlier save left in ``folder``,
    once the compressed weights (``model.upop.safetensors`` or its index) are there: a folder with
    both would be ambiguous (refused on load)."""
    from upop.checkpoint.safe_load import SAFE_INDEX, SAFE_WEIGHTS, UPOP_INDEX, UPOP_WEIGHTS

    if not any((folder / name).is_file() for name in (UPOP_WEIGHTS, UPOP_INDEX)):
        return
    stale = [folder / SAFE_WEIGHTS, folder / SAFE_INDEX]
    stale += [p for p in folder.glob("model-*-of-*.safetensors") if _DENSE_SHARD.fullmatch(p.name)]
    for file in stale:
        if file.is_file() or file.is_symlink():
            file.unlink()


_DENSE_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")

#: ``save_pretrained(..., push_to_hub=True)`` keywords that belong to the push
_PUSH_ARGS = ("repo_id", "commit_message", "commit_description", "create_pr", "private", "revision", "tags")


def _check_group_plan(group: Group, gplan: GroupPlan) -> None:
    kept = gplan.kept
    if gplan.granularity != group.granularity:
        raise CheckpointError(f"plan group {group.name}: granularity {gplan.granularity} but the group's units are "
                              f"{group.granularity} units")
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
    if group.kind == "mlp":
        if len(kept) < group.num_units:
            for name in group.producers:  # fc1, and a gated MLP's gate
                _slice_linear(model.get_submodule(name), torch.as_tensor(kept), dim=0)
            _slice_linear(model.get_submodule(group.consumer), torch.as_tensor(kept), dim=1)
    elif group.grouped and group.whole_heads:
        _slice_grouped(model, spec, group, range(group.channel_units), kept)
    elif group.grouped:
        _slice_grouped(model, spec, group, kept, range(group.head_units))
    elif group.whole_heads:
        _slice_pair(model, spec, group, list(range(group.head_dim)), kept, fold_scale)
    else:
        _slice_pair(model, spec, group, kept, list(range(group.num_heads)), fold_scale)


def _slice_pair(model: nn.Module, spec: ArchSpec, group: Group, kept: list[int], kept_heads: list[int],
                fold_scale: bool) -> None:
    """Slice an attention module of ``group`` to heads ``kept_heads`` of channels ``kept`` (one granularity
    keeps all of the other): rows ``h * head_dim + j`` of Q, K, V and the same out-proj columns; then
    ``num_heads`` and ``head_dim`` follow, and a narrower head keeps the dense attention scale."""
    if group.grouped:
        _slice_grouped(model, spec, group, kept, kept_heads)
        return
    module = model.get_submodule(group.module)
    if spec.swap_class is not None:
        spec.swap_class(module)
    dense_width, dense_heads = group.head_dim, group.num_heads
    width, heads = len(kept), len(kept_heads)
    if width == dense_width and heads == dense_heads:
        return
    for name, fused in [(n, group.fused_qkv) for n in group.producers] + [(group.consumer, False)]:
        rows = cell_rows(dense_width, kept_heads, kept, dense_heads, fused)
        _slice_linear(model.get_submodule(name), rows, dim=1 if name == group.consumer else 0)
    if heads != dense_heads:
        (spec.set_num_heads or set_head_count)(module, heads)
    spec.set_head_dim(module, width, dense_width, heads)
    if fold_scale and width != dense_width and type(module).__name__ in spec.fold_scale_classes:
        fold_query_scale(model, group, width)  # a channel group: num_units is the dense width


def _slice_grouped(model: nn.Module, spec: ArchSpec, group: Group, channel_units, head_units) -> None:
    """Slice an attention module of rotary pairs or grouped-query heads (:attr:`Group.grouped`; the
    channel or the head group of it, or a pair) to channel units ``channel_units`` of whole-head
    units ``head_units``: each producer's rows and the out-proj's columns by
    :meth:`Group.grouped_rows`; then the module's head count, head width and, where pairs were
    pruned, :data:`~upop.arch._spec.ROPE_PAIRS` (the dense index of every kept pair, so the kept
    channels are rotated at their original frequencies). The module's stored attention scale is
    the dense one, so no scale is folded."""
    channel_units, head_units = list(channel_units), list(head_units)
    module = model.get_submodule(group.module)
    if spec.swap_class is not None:
        spec.swap_class(module)
    if len(channel_units) == group.channel_units and len(head_units) == group.head_units:
        return
    for name in (*group.producers, group.consumer):
        rows = group.grouped_rows(name, channel_units, head_units)
        _slice_linear(model.get_submodule(name), rows, dim=1 if name == group.consumer else 0)
    heads = len(head_units) * (group.num_heads // group.head_units)
    if len(head_units) != group.head_units:
        (spec.set_num_heads or set_head_count)(module, heads)
    spec.set_head_dim(module, len(group.channels(channel_units)), group.head_dim, heads)
    if group.rope and len(channel_units) != group.channel_units:
        setattr(module, ROPE_PAIRS, channel_units)


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
