"""Architecture specs: where the prunable groups of a model family live.

A spec is data (tower paths, sub-module names) plus small hooks: how to update an attention
module after its head width or its number of heads changed, and an optional class swap for
forwards that hard-code widths. :func:`find_groups` walks a model with a spec; :mod:`upop.pruning.prune`
slices with the groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from upop.errors import ConfigError
from upop.arch.groups import GRANULARITIES, HEADS_SUFFIX, Group


@dataclass(frozen=True)
class AttentionSite:
    """One attention module inside a block. Paths are relative to the block.

    Either ``q``/``k``/``v`` (separate Linears) or ``qkv`` (one fused Linear) is given.
    ``modality`` overrides the tower's modality (cross-attention of a fusion encoder).
    ``optional`` sites may be absent from a block (e.g. BERT cross-attention).
    ``cross``: keys/values read the other modality (vision tokens).
    """

    module: str
    out: str
    q: str = ""
    k: str = ""
    v: str = ""
    qkv: str = ""
    site: str = "attn"
    modality: str = ""
    cross: bool = False
    optional: bool = False


@dataclass(frozen=True)
class MlpSite:
    """The feed-forward layer of a block: ``fc1`` (produces neurons) and ``fc2`` (consumes)."""

    fc1: str
    fc2: str
    site: str = "mlp"
    modality: str = ""


@dataclass(frozen=True)
class Tower:
    """A ``ModuleList`` of blocks of one modality.

    ``paths`` are the candidate locations of the list from the model root (a model class uses
    the first that exists; several classes of a family differ only by a prefix).
    ``config`` names the sub-config (``"vision_config"``) holding the tower's sizes, if any.
    ``only``: the tower applies only to these ``config.model_type`` values (default: all).
    """

    paths: tuple[str, ...]
    modality: str
    attention: tuple[AttentionSite, ...]
    mlp: MlpSite
    config: str = ""
    only: tuple[str, ...] = ()


def vision_tokens(config, extra_tokens: int = 1) -> int:
    """Tokens a ViT-style encoder sees per image: patches plus class/distillation tokens.

    A NaFlex config (SigLIP2: ``num_patches`` and no ``image_size``) gives its maximum patch count."""
    if getattr(config, "image_size", None) is None and isinstance(getattr(config, "num_patches", None), int):
        return config.num_patches + extra_tokens
    image, patch = config.image_size, config.patch_size
    image = image if isinstance(image, int) else image[0]
    patch = patch if isinstance(patch, int) else patch[0]
    return (image // patch) ** 2 + extra_tokens


@dataclass(frozen=True)
class ArchSpec:
    """Everything upop needs to know about one model family.

    Attributes:
        name: family name (``"clip"``).
        model_types: ``config.model_type`` values this spec handles.
        towers: candidate towers; those present in a model are used.
        set_head_dim: ``(attention_module, new_head_dim, dense_head_dim, heads) -> None``; makes
            the module's forward run with the new head width and the dense attention scale.
            ``heads`` is the module's number of heads after pruning (whole-head pruning calls it
            with ``new_head_dim == dense_head_dim`` and the kept number of heads, after
            ``set_num_heads``, so attributes derived from both, like ``all_head_size``, follow).
        set_num_heads: ``(attention_module, new_heads) -> None``, run when whole heads are pruned;
            default :func:`set_head_count` (sets ``num_heads`` / ``num_attention_heads``).
        fold_scale_classes: attention classes whose forward derives its scale from the current
            head width (no stored scale attribute): pruning multiplies their query rows by
            ``sqrt(new / dense)`` so the dense scale is kept exactly.
        swap_class: ``(attention_module) -> None``, replaces a forward that hard-codes widths with a
            shape-generic one (same parameters, same names).
        vision_extra_tokens: class (+ distillation) tokens of the vision tower.
        classes: model class names of this family (``load_compressed`` resolves only these).
    """

    name: str
    model_types: tuple[str, ...]
    towers: tuple[Tower, ...]
    set_head_dim: Callable[[nn.Module, int, int, int], None]
    fold_scale_classes: tuple[str, ...] = ()
    swap_class: Callable[[nn.Module], None] | None = None
    vision_extra_tokens: int = 1
    classes: tuple[str, ...] = field(default_factory=tuple)
    #: ``(model) -> None``: raises :class:`~upop.errors.UnsupportedModelError` for a model of this
    #: family that the spec cannot slice (e.g. a variant with another MLP)
    check: Callable[[nn.Module], None] | None = None
    set_num_heads: Callable[[nn.Module, int], None] | None = None


HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads")


def set_head_count(module: nn.Module, heads: int) -> None:
    """Default ``set_num_heads``: every integer attribute of ``module`` named in
    :data:`HEAD_COUNT_ATTRS` becomes ``heads`` (what the attention forwards of every supported
    family read, and what :func:`find_groups` reads back from a pruned model)."""
    found = False
    for attr in HEAD_COUNT_ATTRS:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, heads)
            found = True
    if not found:
        raise ValueError(f"{type(module).__name__} has none of {', '.join(HEAD_COUNT_ATTRS)}; give the spec a "
                         "set_num_heads hook to prune its heads")


def check_granularity(granularity: str) -> None:
    """Refuse an unknown granularity with a one-line ConfigError."""
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity={granularity!r} is not allowed; choose one of: {', '.join(GRANULARITIES)}")


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _sub_config(config, name: str):
    sub = getattr(config, name, None) if name else None
    return sub if sub is not None else config


def _vision_config(model: nn.Module, spec: ArchSpec):
    for tower in spec.towers:
        if tower.modality == "vision":
            cfg = _sub_config(model.config, tower.config)
            if hasattr(cfg, "patch_size") and (hasattr(cfg, "image_size") or hasattr(cfg, "num_patches")):
                return cfg
    return None


def _linear(model: nn.Module, name: str) -> nn.Linear:
    mod = model.get_submodule(name)
    if not isinstance(mod, nn.Linear):
        raise TypeError(f"{name} is {type(mod).__name__}, expected nn.Linear")
    return mod


def _bias(lin: nn.Linear) -> int:
    return 1 if lin.bias is not None else 0


def find_groups_with_spec(model: nn.Module, spec: ArchSpec, text_tokens: int | None = None,
                          granularity: str = "head-dim") -> list[Group]:
    """Every prunable group of ``model`` according to ``spec``, in model order; attention units
    are head-dim channels or whole heads as ``granularity`` says; with ``"both"`` each attention
    module gives its channel group followed by its head group (a pair, :attr:`Group.pair`)."""
    check_granularity(granularity)
    if spec.check is not None:
        spec.check(model)
    vcfg = _vision_config(model, spec)
    n_vision = vision_tokens(vcfg, spec.vision_extra_tokens) if vcfg is not None else 0
    groups: list[Group] = []
    for tower in spec.towers:
        if tower.only and model.config.model_type not in tower.only:
            continue
        path = next((p for p in tower.paths if isinstance(_get(model, p), nn.ModuleList)), None)
        if path is None:
            continue
        cfg = _sub_config(model.config, tower.config)
        if tower.modality == "vision":
            n_tok = n_vision
        else:
            n_tok = text_tokens or getattr(cfg, "max_position_embeddings", 0) or 1
        for i, _block in enumerate(model.get_submodule(path)):
            prefix = f"{path}.{i}."
            for site in tower.attention:
                module = _get(model, prefix + site.module)
                if module is None:
                    if site.optional:
                        continue
                    raise ValueError(f"{spec.name} spec: no module {prefix + site.module}")
                if granularity != "both":
                    groups.append(_attention_group(model, spec, tower, site, prefix, i, n_tok, n_vision, granularity))
                    continue
                channels = _attention_group(model, spec, tower, site, prefix, i, n_tok, n_vision, "head-dim")
                heads = _attention_group(model, spec, tower, site, prefix, i, n_tok, n_vision, "head")
                name = channels.name + HEADS_SUFFIX
                groups += [replace(channels, pair=name), replace(heads, name=name, pair=channels.name)]
            groups.append(_mlp_group(model, spec, tower, prefix, i, n_tok))
    return groups


def _attention_group(model, spec, tower, site, prefix, layer, n_tok, n_vision, granularity) -> Group:
    heads = _num_heads(model.get_submodule(prefix + site.module))
    out = _linear(model, prefix + site.out)
    d_out = out.out_features
    if site.qkv:
        qkv = _linear(model, prefix + site.qkv)
        producers = (prefix + site.qkv,)
        width = qkv.out_features // (3 * heads)
        d_q = d_kv = qkv.in_features
        biases = 3 * _bias(qkv)
    else:
        q, k, v = (_linear(model, prefix + n) for n in (site.q, site.k, site.v))
        producers = (prefix + site.q, prefix + site.k, prefix + site.v)
        width = q.out_features // heads
        d_q, d_kv = q.in_features, k.in_features
        biases = _bias(q) + _bias(k) + _bias(v)
    n_q = n_tok
    n_kv = (n_vision or n_tok) if site.cross else n_tok
    # Costs are exact and bilinear in (heads, head_dim): one (head, channel) cell owns a row of each of
    # Q, K, V (and its biases) and a column of the out-proj; its FLOPs are the Q, K, V projections,
    # scores (q.k) and weighted values (p.v), and the out-proj, 2 FLOPs per MAC. A channel unit spans
    # every head, a whole-head unit every channel of its head.
    cell_params = biases + d_q + 2 * d_kv + d_out
    cell_flops = 2 * (n_q * d_q + 2 * n_kv * d_kv + 2 * n_q * n_kv + n_q * d_out)
    whole = granularity == "head"
    cells = width if whole else heads
    return Group(
        name=prefix + site.site,
        kind="attention",
        modality=site.modality or tower.modality,
        layer=layer,
        num_units=heads if whole else width,
        num_heads=heads,
        producers=producers,
        consumer=prefix + site.out,
        fused_qkv=bool(site.qkv),
        module=prefix + site.module,
        param_cost=cells * cell_params,
        flop_cost=cells * cell_flops,
        tokens_q=n_q,
        tokens_kv=n_kv,
        spec=spec.name,
        granularity="head" if whole else "head-dim",
        head_dim=width,
    )


def _mlp_group(model, spec, tower, prefix, layer, n_tok) -> Group:
    site = tower.mlp
    fc1, fc2 = _linear(model, prefix + site.fc1), _linear(model, prefix + site.fc2)
    return Group(
        name=prefix + site.site,
        kind="mlp",
        modality=site.modality or tower.modality,
        layer=layer,
        num_units=fc1.out_features,
        num_heads=1,
        producers=(prefix + site.fc1,),
        consumer=prefix + site.fc2,
        fused_qkv=False,
        module=prefix.rstrip("."),
        param_cost=fc1.in_features + _bias(fc1) + fc2.out_features,
        flop_cost=2 * n_tok * (fc1.in_features + fc2.out_features),
        tokens_q=n_tok,
        tokens_kv=n_tok,
        spec=spec.name,
    )


def _num_heads(module: nn.Module) -> int:
    for attr in ("num_heads", "num_attention_heads"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    cfg = getattr(module, "config", None)
    if cfg is not None and hasattr(cfg, "num_attention_heads"):
        return cfg.num_attention_heads
    raise ValueError(f"cannot tell the number of heads of {type(module).__name__}")


def set_attrs(**attrs: Callable[[int, int, int], int]):
    """A ``set_head_dim`` hook that sets attributes from ``(new, dense, heads)``."""

    def hook(module: nn.Module, new: int, dense: int, heads: int) -> None:
        for attr, fn in attrs.items():
            setattr(module, attr, fn(new, dense, heads))

    return hook


@torch.no_grad()
def fold_query_scale(model: nn.Module, group: Group, new: int) -> None:
    """Multiply the query rows so ``q.k / sqrt(new)`` equals the dense ``q.k / sqrt(dense)``."""
    factor = (new / group.num_units) ** 0.5
    q = model.get_submodule(group.producers[0])
    if group.fused_qkv:
        rows = slice(0, q.out_features // 3)
        q.weight[rows] *= factor
        if q.bias is not None:
            q.bias[rows] *= factor
    else:
        q.weight.mul_(factor)
        if q.bias is not None:
            q.bias.mul_(factor)
