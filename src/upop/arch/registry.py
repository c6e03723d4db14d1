"""The family registry: one registration per model family, in the family's own module.

A family module (``arch/clip.py``, ``arch/blip.py``, ...) ends with one call::

    register_family(Family(
        spec=SPEC,                                           # how to find and slice its groups
        classes=(ModelClass("CLIPModel", tasks=("retrieval", "distill"), reads=("image", "text"),
                            export={"vision": "features", "text": "features"}), ...),
        tiny=(TinyModel("clip", "CLIPModel", build=_tiny_clip, processor=_clip_processor,
                        data_task="retrieval"),),
    ))

and ``arch/__init__.py`` imports every module of the package, so a new family is one new file.
Everything else reads this registry: the architecture lookup (``config.model_type`` -> spec), the
classes ``load_compressed`` may build (and where upop's own classes live), the classes each task
accepts and how the label-free task reads them, what ``upop export`` exports or refuses,
``upop make-model`` (tiny factories, Shapes processors and class names), ``make gpu-check`` and the
tests' guarantee tables (every registered (family, task) pair is in each of them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from upop.errors import UnsupportedModelError
from upop.arch._spec import ArchSpec

#: per-size widths of the tiny factories: (hidden, layers, heads, intermediate)
SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (32, 2, 4, 64),
    "small": (64, 4, 4, 192),
    "base": (768, 12, 12, 3072),
}

READS = ("image", "text")


@dataclass(frozen=True)
class ModelClass:
    """One model class of a family and what upop does with it.

    ``tasks``: the tasks it serves (``"distill"``, the label-free task, wherever it reads images or
    text). ``reads``: its inputs, ``"image"`` and/or ``"text"`` (the label-free task pairs a
    two-tower model's embeddings and matches a one-tower model's outputs). ``project``:
    ``"module:Class"`` for a class upop defines (a task model transformers lacks). ``export``:
    part (``"vision"``/``"text"``) -> ``"features"`` (exported through ``get_*_features``) or
    the name of the tower's submodule. ``export_refused``: why the whole forward is not one graph
    worth exporting (None: it exports). ``retrieval``: the retrieval variant that trains and
    evaluates the class (None: CLIP's contrastive one). ``causal``: a decoder that reads left to
    right (a ``*ForCausalLM``): its first token sees no other, so the label-free task summarises a
    text by its last real token instead of its first (a class declared False, or not registered,
    is causal where its config says ``is_decoder``). ``chat``: a chat-template vision-language model
    (LLaVA...): its tasks build prompts with the processor's chat template and answer by
    generation (:mod:`upop.tasks.vlm_chat`).
    """

    name: str
    tasks: tuple[str, ...] = ()
    reads: tuple[str, ...] = ("image",)
    project: str | None = None
    export: dict[str, str] = field(default_factory=dict)
    export_refused: str | None = None
    retrieval: str | None = None
    causal: bool = False
    chat: bool = False

    def __post_init__(self):
        if not self.reads or set(self.reads) - set(READS):
            raise ValueError(f"{self.name}: reads must be some of {READS}, not {self.reads!r}")


@dataclass(frozen=True)
class TinyModel:
    """A randomly initialised model of a family for ``upop make-model``, the demo and the tests.

    ``build(widths, vocab_size, image_size, num_labels)`` returns the model (``widths`` from
    :data:`SIZES`); ``processor(image_size, shapes_tokenizer)`` its Shapes tokenizer and/or image
    processor; ``data_task`` the task of the Shapes data it is made for (None: no task serves its
    class yet; ``make-model`` builds it and :func:`pairs` gives nothing for it); ``class_names()``
    the classes of that data its head predicts, in the reader's order (None: no class head).
    """

    name: str
    model_class: str
    build: Callable[[tuple[int, int, int, int], int, int, int], nn.Module]
    processor: Callable[[int, Any], Any]
    data_task: str | None
    class_names: Callable[[], list[str]] | None = None


@dataclass(frozen=True)
class Family:
    """A registered family: its spec, its classes and its tiny models. ``project_config``:
    ``"module:Class"`` of the config class upop defines for the spec's model types (None: a
    transformers config); a compressed folder's ``modeling_upop.py`` copies it with the model."""

    spec: ArchSpec
    classes: tuple[ModelClass, ...]
    tiny: tuple[TinyModel, ...] = ()
    project_config: str | None = None

    def __post_init__(self):
        if self.project_config is not None and not (isinstance(self.project_config, str)
                                                    and all(self.project_config.partition(":")[::2])):
            raise ValueError(f"family {self.spec.name!r}: project_config must be 'module:Class', "
                             f"not {self.project_config!r}")
        names = {c.name for c in self.classes}
        for tiny in self.tiny:
            if tiny.model_class not in names:
                raise ValueError(f"family {self.spec.name!r}: tiny model {tiny.name!r} builds {tiny.model_class}, "
                                 "which is not one of its classes")
            served = next(c for c in self.classes if c.name == tiny.model_class).tasks
            if tiny.data_task is not None and tiny.data_task not in served:
                raise ValueError(f"family {self.spec.name!r}: tiny model {tiny.name!r} is made for "
                                 f"{tiny.data_task!r}, a task its class does not serve")


FAMILIES: dict[str, Family] = {}
"""spec name -> family, in registration order."""
CLASSES: dict[str, tuple[Family, ModelClass]] = {}
"""model class name -> (family, class)."""
TINY: dict[str, TinyModel] = {}
"""make-model name -> tiny model."""


SPECS: dict[str, ArchSpec] = {}
"""``config.model_type`` -> spec (a family's, or one a user registered with :func:`register_spec`)."""


def register_spec(spec: ArchSpec, *, replace: bool = False) -> None:
    """Register ``spec`` for each of its ``model_types`` (a family registers its own; a user may
    register a spec of theirs, e.g. for a model class upop does not ship)."""
    for model_type in spec.model_types:
        if model_type in SPECS and not replace:
            raise ValueError(f"model_type {model_type!r} already has the spec {SPECS[model_type].name!r}")
        SPECS[model_type] = spec


def supported_model_types() -> list[str]:
    return sorted(SPECS)


def get_spec(model: nn.Module) -> ArchSpec:
    """The spec for ``model`` (by ``model.config.model_type``), or a clear error."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SPECS:
        raise UnsupportedModelError(
            f"model type {model_type!r} ({type(model).__name__}) is not supported; "
            f"supported model types: {', '.join(supported_model_types())} (or pass spec=ArchSpec(...))"
        )
    return SPECS[model_type]


def spec_by_name(name: str) -> ArchSpec:
    for spec in SPECS.values():
        if spec.name == name:
            return spec
    raise UnsupportedModelError(f"no architecture spec named {name!r}; known: {sorted({s.name for s in SPECS.values()})}")


def known_classes() -> set[str]:
    """Every model class name upop may build: the families' and those of user-registered specs."""
    return set(CLASSES) | {c for spec in SPECS.values() for c in spec.classes}


def register_family(family: Family) -> Family:
    """Register ``family`` (its spec, classes and tiny models); a name taken twice is refused."""
    name = family.spec.name
    taken = ([f"family {name!r}"] if name in FAMILIES else []) + \
        [f"class {c.name!r}" for c in family.classes if c.name in CLASSES] + \
        [f"tiny model {t.name!r}" for t in family.tiny if t.name in TINY]
    if taken:
        raise ValueError(f"already registered: {', '.join(taken)}")
    register_spec(family.spec)
    FAMILIES[name] = family
    for cls in family.classes:
        CLASSES[cls.name] = (family, cls)
    for tiny in family.tiny:
        TINY[tiny.name] = tiny
    return family


def model_class_info(name: str) -> ModelClass | None:
    """The registered :class:`ModelClass` named ``name``, or None."""
    entry = CLASSES.get(name)
    return entry[1] if entry else None


def project_config(model_type: object) -> str | None:
    """``"module:Class"`` of the config class upop defines for ``model_type`` (a family's
    ``project_config``), or None where the config is a transformers class."""
    for family in FAMILIES.values():
        if family.project_config is not None and model_type in family.spec.model_types:
            return family.project_config
    return None


def classes_for(task: str) -> tuple[str, ...]:
    """The registered model classes that serve ``task``, in registration order."""
    return tuple(name for name, (_, cls) in CLASSES.items() if task in cls.tasks)


def pairs() -> list[tuple[str, str]]:
    """Every (tiny model, task) pair the registry declares: each tiny model with every task its
    class serves (none for a tiny model made for no task yet, ``data_task=None``). The guarantee
    tables of the tests iterate this."""
    return [(tiny.name, task) for tiny in TINY.values() if tiny.data_task is not None
            for task in CLASSES[tiny.model_class][1].tasks]
