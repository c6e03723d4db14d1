"""The graphs :mod:`upop.export.onnx` writes: a model, or one tower of it, as a module of plain tensors
in and out (:class:`Graph`), the inputs built from its config (:func:`example_inputs`), and which
classes and towers export at all (:data:`TOWERS`, :data:`REFUSED`, :func:`graph_of`).

``part`` exports one tower alone, in one of two ways (:data:`TOWERS`):

- ``"features"`` (CLIP, SigLIP, and SigLIP2's text tower): ``get_image_features`` /
  ``get_text_features``, L2-normalised, as ``image_embeds`` / ``text_embeds`` (the same values as
  the whole model's outputs of that name);
- a submodule's path (BLIP's ``vision_model``, LLaVA's ``model.vision_tower``): that module's own
  forward, ``pixel_values`` to ``last_hidden_state`` and ``pooler_output`` (what BLIP's text
  encoder and decoder attend to; LLaVA's projector reads a hidden state of that tower).

``pooling`` (:func:`resolve_pooling`) exports a text encoder class (one the registry declares as
reading text only: BERT and its heads, CLIP / SigLIP / SigLIP2 text models) as a sentence embedder:
its base encoder (``model.base_model``: a ``BertModel`` for every BERT head) from ``input_ids``,
``attention_mask`` (and ``token_type_ids`` where the config has token types) to
``last_hidden_state`` and ``sentence_embedding``, the pooling of the last hidden state by
:meth:`upop.models.sentence_transformers.Pooling.embed` (the one the label-free task compares),
L2-normalised when the pooling says so (a sentence-transformers pipeline with ``Normalize``).
``"auto"``: a folder with ``modules.json`` pools as its pipeline does; a text encoder without it
pools the mean of the real tokens (what sentence-transformers uses for a plain transformers
model); any other class (or a ``part``) exports as without pooling. A mode given by name
(``"mean"``, ``"cls"``...) is that mode alone, unnormalised, and is refused for a class that is no
text encoder.
"""

from __future__ import annotations

import copy
import inspect
import os

import torch
from torch import nn

from upop.arch import CLASSES, model_class_info
from upop.errors import ConfigError, UnsupportedModelError
from upop.export.options import POOLINGS
from upop.models.sentence_transformers import Pooling, is_sentence_transformers, read_pipeline

PARTS = ("vision", "text")
#: class -> {part: "features" or the name of the tower's submodule}: the towers ``part`` exports
#: (each family declares its classes' ``ModelClass.export``)
TOWERS: dict[str, dict[str, str]] = {name: dict(info.export) for name, (_, info) in CLASSES.items() if info.export}
#: the classes whose towers are all exportable (kept for callers of the earlier name)
TWO_TOWERS = tuple(name for name, parts in TOWERS.items() if set(parts) == set(PARTS))
#: classes (or their towers not in TOWERS) whose forward is not one graph worth exporting, and why
#: (``ModelClass.export_refused``)
REFUSED = {name: info.export_refused for name, (_, info) in CLASSES.items() if info.export_refused}
_NOT_OUTPUTS = ("loss", "hidden_states", "attentions", "past_key_values")
#: the outputs of a pooled graph
POOLED_OUTPUTS = ("last_hidden_state", "sentence_embedding")


def text_encoders() -> list[str]:
    """The registered classes ``--pooling`` accepts: those that read text only."""
    return [name for name, (_, info) in CLASSES.items() if tuple(info.reads) == ("text",)]


class Graph(nn.Module):
    """``model`` (or one tower of it) as a module of positional tensors in, a tuple of tensors out.

    ``source``: the class of the model folder (``model`` itself may be a tower of it); ``features``:
    export ``part`` through ``get_*_features`` (L2-normalised) instead of ``model``'s forward;
    ``pooling``: ``model`` is a text encoder whose ``last_hidden_state`` is also pooled into
    ``sentence_embedding`` (see the module docstring); ``pooling_source``: where that pooling came from."""

    def __init__(self, model: nn.Module, part: str | None, *, features: bool = False, source: str | None = None,
                 pooling: Pooling | None = None, pooling_source: str | None = None):
        super().__init__()
        self.model, self.part, self.features, self.kwargs = model, part, features, {}
        self.pooling, self.pooling_source = pooling, pooling_source
        self.source = source or type(model).__name__
        params = inspect.signature(model.forward).parameters
        if features:
            self.input_names = ["pixel_values"] if part == "vision" else ["input_ids", "attention_mask"]
        else:
            text = ("input_ids", "attention_mask", "token_type_ids") if "input_ids" in params else ()
            self.input_names = [n for n in (*text, "pixel_values") if n in params]
            if "token_type_ids" in self.input_names and not getattr(_text_config(model), "type_vocab_size", 0):
                self.input_names.remove("token_type_ids")
            self.kwargs = {k: v for k, v in (("use_cache", False), ("return_dict", True)) if k in params}
        if not self.input_names:
            raise UnsupportedModelError(f"{type(model).__name__} takes neither pixel_values nor input_ids; upop "
                                        "export handles vision and text encoders")
        if pooling is not None and "input_ids" not in self.input_names:
            raise UnsupportedModelError(f"{self.source} is exported through {type(model).__name__}, which takes no "
                                        "input_ids: there are no token states to pool")
        self.output_names: list[str] = ({"vision": ["image_embeds"], "text": ["text_embeds"]}[part]
                                        if features else list(POOLED_OUTPUTS) if pooling is not None else [])

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = dict(zip(self.input_names, args))
        if self.pooling is not None:
            last = getattr(self.model(**inputs, **self.kwargs), "last_hidden_state", None)
            if last is None:
                raise UnsupportedModelError(f"{self.source}: {type(self.model).__name__} gives no last_hidden_state "
                                            "to pool")
            return last, self.pooling.embed(last, inputs.get("attention_mask"))
        if self.features:
            get = self.model.get_image_features if self.part == "vision" else self.model.get_text_features
            features = get(**inputs)
            features = getattr(features, "pooler_output", features)
            return (features / features.norm(p=2, dim=-1, keepdim=True),)
        out = self.model(**inputs, **self.kwargs)
        items = [(k, v) for k, v in out.items() if k not in _NOT_OUTPUTS and torch.is_tensor(v)]
        self.output_names = self.output_names or [k for k, _ in items]
        return tuple(v for _, v in items)


def _text_config(model: nn.Module):
    return getattr(model.config, "text_config", None) or model.config


def max_text_tokens(model: nn.Module) -> int:
    return int(getattr(_text_config(model), "max_position_embeddings", 0) or 512)


def example_inputs(graph: Graph, batch: int, sequence: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs for ``graph`` built from the model's config (see :mod:`upop.export.onnx`)."""
    g = torch.Generator().manual_seed(seed)
    inputs: dict[str, torch.Tensor] = {}
    shape = (batch, 2, sequence) if type(graph.model).__name__.endswith("MultipleChoice") else (batch, sequence)
    for name in graph.input_names:
        if name == "pixel_values":
            cfg = getattr(graph.model.config, "vision_config", None) or graph.model.config
            size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
            inputs[name] = torch.randn(batch, getattr(cfg, "num_channels", 3), size, size, generator=g)
        elif name == "input_ids":
            vocab = int(_text_config(graph.model).vocab_size)
            inputs[name] = torch.randint(min(5, vocab - 1), vocab, shape, generator=g)
        elif name == "attention_mask":
            inputs[name] = torch.ones(shape, dtype=torch.long)
            inputs[name][1::2, ..., max(1, sequence - sequence // 4):] = 0  # padded rows
        else:
            inputs[name] = torch.zeros(shape, dtype=torch.long)
    return inputs


def dynamic_axes(graph: Graph, inputs: dict[str, torch.Tensor]) -> dict[str, dict[int, str]]:
    return {n: ({0: "batch"} if n == "pixel_values" else {0: "batch", inputs[n].dim() - 1: "sequence"})
            for n in graph.input_names}


def _cpu_fp32(model: nn.Module) -> nn.Module:
    """The caller's ``model`` as the exporter needs it: on the CPU in float32 and in eval mode.
    A model elsewhere (a GPU), in another dtype or in training mode is copied first, so the export
    never moves, casts or switches the caller's model (the graph is traced on the CPU, where the
    parity reference and its example inputs are)."""
    tensors = [*model.parameters(), *model.buffers()]
    ready = not model.training and all(t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point())
                                       for t in tensors)
    return model if ready else copy.deepcopy(model).to("cpu", torch.float32).eval()


def resolve_pooling(name: str, pooling: str | Pooling, part: str | None, folder: str | os.PathLike | None,
                    what: str) -> tuple[Pooling | None, str | None]:
    """The :class:`Pooling` that ``pooling`` (one of :data:`upop.export.options.POOLINGS`, or a
    :class:`Pooling` itself) stands for on a model of class ``name`` loaded from ``folder`` (None:
    unknown), and where it came from; (None, None) for no pooling. A mode given by name (or a
    :class:`Pooling`) on a class that is no text encoder, or with ``part``, is refused in one line
    (see the module docstring for ``"auto"``)."""
    if not isinstance(pooling, Pooling) and pooling not in POOLINGS:
        raise ConfigError(f"pooling {pooling!r} is not allowed; need one of: {', '.join(POOLINGS)}")
    if pooling == "none":
        return None, None
    info = model_class_info(name)
    encoder = info is not None and tuple(info.reads) == ("text",)
    if pooling == "auto":
        if part is not None or not encoder:
            return None, None
        if folder is not None and is_sentence_transformers(folder):
            return read_pipeline(folder).pooling, "the sentence-transformers pipeline of modules.json"
        return Pooling(("mean",)), "auto: the folder has no modules.json"
    given = pooling.describe() if isinstance(pooling, Pooling) else pooling
    allowed = f"--pooling needs a text encoder class ({', '.join(text_encoders())})"
    if part is not None:
        raise ConfigError(f"--pooling {given} pools a text encoder's token states, but {what} is a {name} exported "
                          f"with --part {part}, whose output the model pools itself; leave out --pooling or --part "
                          f"({allowed})")
    if not encoder:
        reads = " and ".join(info.reads) if info is not None else "inputs upop does not know"
        raise UnsupportedModelError(f"{allowed}; {what} is a {name}, which reads {reads}")
    return (pooling, "given") if isinstance(pooling, Pooling) else (Pooling((pooling,)), f"--pooling {pooling}")


def graph_of(model, part: str | None, what: str, pooling: str | Pooling = "none",
             folder: str | os.PathLike | None = None) -> Graph:
    """Load ``model`` (a folder or a module) as float32 and wrap it (or its ``part`` tower, or its
    base encoder with ``pooling``: a name of :data:`upop.export.options.POOLINGS` resolved for the
    model of ``folder`` by :func:`resolve_pooling`, or a :class:`Pooling`), or refuse it in one line."""
    if not isinstance(model, nn.Module):
        from upop.models.folders import load_any

        model = load_any(model)[0]
    else:
        model = _cpu_fp32(model)
    model = model.float().eval()
    name = type(model).__name__
    chosen, source = resolve_pooling(name, pooling, part, folder, what)
    if chosen is not None:
        return Graph(model.base_model, None, source=name, pooling=chosen, pooling_source=source)
    towers = TOWERS.get(name, {})
    hint = "; export its " + " or ".join(f"{p} tower with --part {p}" for p in towers) if towers else ""
    if part is None:
        if name in REFUSED:
            raise UnsupportedModelError(f"{what} is a {name}, which upop export does not export"
                                        f"{' whole' if towers else ''}: {REFUSED[name]}{hint}")
        return Graph(model, None)
    if not towers:
        raise ConfigError(f"--part {part} needs a two-tower model whose {part} tower exports "
                          f"({', '.join(n for n, p in TOWERS.items() if part in p)}); {what} is a {name}, exported "
                          "whole (leave out --part)")
    if part not in towers:
        raise UnsupportedModelError(f"{what} is a {name}, whose {part} tower upop export does not export: "
                                    f"{REFUSED.get(name, 'no such tower')}{hint}")
    if towers[part] == "features":
        return Graph(model, part, features=True)
    return Graph(model.get_submodule(towers[part]), part, source=name)
