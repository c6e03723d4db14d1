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
    ``rope``: queries and keys are rotated by rotary position embeddings (channel ``j`` with
    ``j + head_dim / 2``), so a channel unit is such a pair (:attr:`Group.rope`). Keys and values
    with fewer heads than the queries (grouped-query attention) are read from the weights' shapes.
    ``norms``: per-head norms over ``head_dim`` (Qwen3's ``q_norm`` / ``k_norm``), counted where a
    block has them: a channel unit owns one weight of each (:attr:`Group.channel_params`).
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
    rope: bool = False
    norms: tuple[str, ...] = ()


@dataclass(frozen=True)
class MlpSite:
    """The feed-forward layer of a block: ``fc1`` (produces neurons) and ``fc2`` (consumes).

    ``gate``: the other producer of a gated MLP (SwiGLU: ``down(act(gate(x)) * up(x))``; ``fc1`` is
    the up projection). A neuron owns a row of each and a column of ``fc2``; the mask multiplies
    ``fc1``'s output only, so the masked neuron is ``act(gate) * up * mask``."""

    fc1: str
    fc2: str
    gate: str = ""
    site: str = "mlp"
    modality: str = ""


@dataclass(frozen=True)
class Tower:
    """A ``ModuleList`` of blocks of one modality.

    ``paths`` are the candidate locations of the list from the model root (a model class uses
    the first that exists; several classes of a family differ only by a prefix).
    ``config`` names the sub-config (``"vision_config"``) holding the tower's sizes, if any.
    ``only``: the tower applies only to these ``config.model_type`` values (default: all).
    ``tokens``: ``(model config, text_tokens) -> tokens`` each block sees, for FLOPs costs, where
    the default (a vision tower's patches and extra tokens; ``text_tokens`` or the text config's
    maximum positions) is not it (e.g. a decoder that also reads image tokens).
    ``blocks``: ``(model config) -> n``: only the first ``n`` blocks reach the model's outputs and
    are groups; the others are left as they are (default: every block).
    """

    paths: tuple[str, ...]
    modality: str
    attention: tuple[AttentionSite, ...]
    mlp: MlpSite
    config: str = ""
    only: tuple[str, ...] = ()
    tokens: Callable[[object, int | None], int] | None = None
    blocks: Callable[[object], int] | None = None


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
#: attribute of an attention module with rotary pairs, set by pruning: the dense index of every
#: kept pair, in the pruned order (absent on a dense module); its forward rotates pruned channel
#: ``i`` (and ``i + kept``) at the dense frequency of pair ``rope_pairs[i]``
ROPE_PAIRS = "rope_pairs"


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
        if tower.tokens is not None:
            n_tok = tower.tokens(model.config, text_tokens)
        elif tower.modality == "vision":
            n_tok = n_vision
        else:
            n_tok = text_tokens or getattr(cfg, "max_position_embeddings", 0) or 1
        blocks = list(model.get_submodule(path))
        for i, _block in enumerate(blocks[:tower.blocks(model.config)] if tower.blocks is not None else blocks):
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
    kv_heads = heads
    if site.qkv:
        qkv = _linear(model, prefix + site.qkv)
        producers = (prefix + site.qkv,)
        width = qkv.out_features // (3 * heads)
        d_q = d_kv = qkv.in_features
        bias_q, bias_kv = _bias(qkv), 2 * _bias(qkv)
    else:
        q, k, v = (_linear(model, prefix + n) for n in (site.q, site.k, site.v))
        producers = (prefix + site.q, prefix + site.k, prefix + site.v)
        width = q.out_features // heads
        kv_heads = k.out_features // width
        if kv_heads < 1 or heads % kv_heads or k.out_features != kv_heads * width or v.out_features != k.out_features:
            raise ValueError(f"{spec.name} spec: {prefix + site.module} has {heads} query heads of width {width} but K "
                             f"and V of {k.out_features} and {v.out_features} features")
        d_q, d_kv = q.in_features, k.in_features
        bias_q, bias_kv = _bias(q), _bias(k) + _bias(v)
    if site.rope and width % 2:
        raise ValueError(f"{spec.name} spec: {prefix + site.module} has rotary pairs but an odd head width {width}")
    n_q = n_tok
    n_kv = (n_vision or n_tok) if site.cross else n_tok
    # Costs are exact and bilinear in (heads, head_dim): one (query head, channel) cell owns a row of
    # Q (and its bias) and a column of the out-proj; one (K/V head, channel) cell a row of each of K
    # and V. FLOPs: the Q, K, V projections, scores (q.k) and weighted values (p.v) per query head,
    # and the out-proj, 2 FLOPs per MAC. A channel unit spans every head (a rotary pair: two
    # channels), a whole-head unit every channel of one K/V head and its query heads.
    q_params, kv_params = bias_q + d_q + d_out, bias_kv + 2 * d_kv
    q_flops, kv_flops = 2 * (n_q * d_q + 2 * n_q * n_kv + n_q * d_out), 2 * 2 * n_kv * d_kv
    whole = granularity == "head"
    grouped = site.rope or kv_heads != heads
    # per-head norms over head_dim (one weight per channel, shared by every head): a channel unit
    # owns its channels' weights whatever the heads; whole heads leave the norms as they are
    norms = sum(1 for n in site.norms if getattr(_get(model, prefix + n), "weight", None) is not None
                and _get(model, prefix + n).weight.numel() == width)
    channel_params = 0
    if whole:
        per_q = heads // kv_heads
        unit_params, unit_flops = width * (per_q * q_params + kv_params), width * (per_q * q_flops + kv_flops)
    else:
        pair = 2 if site.rope else 1
        channel_params = pair * norms
        unit_params = pair * (heads * q_params + kv_heads * kv_params) + channel_params
        unit_flops = pair * (heads * q_flops + kv_heads * kv_flops)
    if whole:
        num_units = kv_heads
    else:
        num_units = width // 2 if site.rope else width
    return Group(
        name=prefix + site.site,
        kind="attention",
        modality=site.modality or tower.modality,
        layer=layer,
        num_units=num_units,
        num_heads=heads,
        producers=producers,
        consumer=prefix + site.out,
        fused_qkv=bool(site.qkv),
        module=prefix + site.module,
        param_cost=unit_params,
        flop_cost=unit_flops,
        tokens_q=n_q,
        tokens_kv=n_kv,
        spec=spec.name,
        granularity="head" if whole else "head-dim",
        head_dim=width,
        kv_heads=kv_heads if grouped else 0,
        rope=site.rope,
        channel_params=channel_params,
    )


def _mlp_group(model, spec, tower, prefix, layer, n_tok) -> Group:
    site = tower.mlp
    fc1, fc2 = _linear(model, prefix + site.fc1), _linear(model, prefix + site.fc2)
    producers, d_in = (prefix + site.fc1,), fc1.in_features + _bias(fc1)
    if site.gate:
        gate = _linear(model, prefix + site.gate)
        producers, d_in = producers + (prefix + site.gate,), d_in + gate.in_features + _bias(gate)
    return Group(
        name=prefix + site.site,
        kind="mlp",
        modality=site.modality or tower.modality,
        layer=layer,
        num_units=fc1.out_features,
        num_heads=1,
        producers=producers,
        consumer=prefix + site.fc2,
        fused_qkv=False,
        module=prefix.rstrip("."),
        param_cost=d_in + fc2.out_features,
        flop_cost=2 * n_tok * (fc1.in_features + (len(producers) - 1) * fc1.in_features + fc2.out_features),
        tokens_q=n_tok,
        tokens_kv=n_tok,
        spec=spec.name,
        masked=(prefix + site.fc1,) if site.gate else (),
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
