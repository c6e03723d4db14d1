"""Architecture registry: one :class:`ArchSpec` per model family, keyed by ``config.model_type``.

All specs are registered here, in one visible place. A user can register a spec of their own
with :func:`register_spec` or pass one to :func:`find_groups` directly.
"""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from ..groups import Group
from . import bert, blip, clip, vit
from . import dinov2, segmenter, siglip, siglip2
from ._spec import ArchSpec, AttentionSite, MlpSite, Tower, set_attrs, vision_tokens

_REGISTRY: dict[str, ArchSpec] = {}


def register_spec(spec: ArchSpec, *, replace: bool = False) -> None:
    """Register ``spec`` for each of its ``model_types``."""
    for model_type in spec.model_types:
        if model_type in _REGISTRY and not replace:
            raise ValueError(f"model_type {model_type!r} already has the spec {_REGISTRY[model_type].name!r}")
        _REGISTRY[model_type] = spec


for _spec in (clip.SPEC, blip.SPEC, vit.VIT, vit.DEIT, bert.SPEC, segmenter.SPEC, siglip.SPEC, siglip2.SPEC, dinov2.SPEC):
    register_spec(_spec)


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(model: nn.Module) -> ArchSpec:
    """The spec for ``model`` (by ``model.config.model_type``), or a clear error."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        raise UnsupportedModelError(
            f"model type {model_type!r} ({type(model).__name__}) is not supported; "
            f"supported model types: {', '.join(supported_model_types())} (or pass spec=ArchSpec(...))"
        )
    return _REGISTRY[model_type]


def spec_by_name(name: str) -> ArchSpec:
    for spec in _REGISTRY.values():
        if spec.name == name:
            return spec
    raise UnsupportedModelError(f"no architecture spec named {name!r}; known: {sorted({s.name for s in _REGISTRY.values()})}")


def find_groups(model: nn.Module, spec: ArchSpec | None = None, text_tokens: int | None = None,
                granularity: str = "head-dim") -> list[Group]:
    """Every prunable group of ``model`` (attention and MLP of every block of every modality).

    ``text_tokens`` sets the text length used for FLOPs costs (default: the model's maximum).
    ``granularity`` says what an attention unit is: ``"head-dim"`` (default, the paper: channel
    ``j`` of every head; pruning narrows ``head_dim``) or ``"head"`` (a whole head; pruning keeps
    ``head_dim`` and removes heads) or ``"both"`` (two groups per attention module, its channels
    ``<name>`` and its heads ``<name>.heads``, ranked together; pruning narrows ``head_dim`` and
    removes heads; see :attr:`Group.pair`). MLP units are neurons in every case.
    """
    from ._spec import check_granularity, find_groups_with_spec

    check_granularity(granularity)
    spec = spec or get_spec(model)
    groups = find_groups_with_spec(model, spec, text_tokens, granularity)
    if not groups:
        raise UnsupportedModelError(f"{type(model).__name__}: the {spec.name!r} spec found no prunable blocks")
    return groups


__all__ = [
    "ArchSpec",
    "AttentionSite",
    "MlpSite",
    "Tower",
    "find_groups",
    "get_spec",
    "register_spec",
    "set_attrs",
    "spec_by_name",
    "supported_model_types",
    "vision_tokens",
]
