"""Architecture registry: one :class:`ArchSpec` per model family, keyed by ``config.model_type``.

Each family registers itself in its own module (:func:`register_family`, see :mod:`.registry`);
this package imports every module in it. A user can register a spec of their own with
:func:`register_spec` or pass one to :func:`find_groups` directly.
"""

from __future__ import annotations

from torch import nn

import importlib
import pkgutil

from upop.arch.groups import Group
from upop.arch.registry import (CLASSES, FAMILIES, SIZES, SPECS, TINY, Family, ModelClass, TinyModel, classes_for,  # noqa: F401
                      get_spec, known_classes, model_class_info, pairs, register_family, register_spec, spec_by_name,
                      supported_model_types)
from upop.arch._spec import ArchSpec, AttentionSite, MlpSite, Tower, set_attrs, vision_tokens
from upop.errors import UnsupportedModelError

#: the modules of this package that are not families: the registry itself and the group type
INFRASTRUCTURE = frozenset({"groups", "registry"})

# every family module registers itself (``register_family`` at its end): a new family is a new file
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)
                      if not m.name.startswith("_") and m.name not in INFRASTRUCTURE):
    importlib.import_module(f"{__name__}.{_module}")


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
    from upop.arch._spec import check_granularity, find_groups_with_spec

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
