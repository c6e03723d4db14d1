"""sentence-transformers folders: the pooling around the transformer, and the files that carry it.

A sentence-transformers model folder is a Hugging Face model folder plus ``modules.json``, the list
of modules that turn the transformer's token states into one sentence embedding, e.g. for
all-MiniLM-L6-v2::

    modules.json                        Transformer (path ""), Pooling ("1_Pooling"), Normalize ("2_Normalize")
    1_Pooling/config.json               pooling_mode_mean_tokens: true, ...
    sentence_bert_config.json           max_seq_length, do_lower_case
    config_sentence_transformers.json   library versions, prompts, similarity function

upop reads these files itself (the sentence-transformers library is not needed) into a
:class:`Pipeline`: its :class:`Pooling` (modes and normalisation, :meth:`Pooling.embed` with the
library's semantics) is what the label-free task compares (:mod:`upop.tasks.distill`), and its
:meth:`Pipeline.files` are what a compressed folder carries over
(:func:`upop.checkpoint.folder.save_compressed`), so ``SentenceTransformer(compressed,
trust_remote_code=True)`` gives the same embeddings as :func:`upop.load_compressed` plus this pooling.

Supported modules: ``Transformer`` (the model folder itself), ``Pooling`` and ``Normalize``. A
``Dense`` layer (or any other module) is refused in one line for now: its weights are outside the
model upop prunes, and a pipeline carried without it would give other embeddings silently.

``modules.json`` has been checked for code hooks (module types outside ``sentence_transformers.``)
by upop's folder checks before any model of the folder is loaded (:mod:`upop.checkpoint.allow_list`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from upop.checkpoint.safe_load import read_json
from upop.errors import CheckpointError, UnsupportedModelError, show

MODULES_FILE = "modules.json"
#: the pipeline's own files at the top of the folder (besides the transformer's config and weights)
PIPELINE_FILES = (MODULES_FILE, "sentence_bert_config.json", "config_sentence_transformers.json")
#: tokenizer files the Transformer module reads, carried when the compressed folder lacks them
TOKENIZER_FILES = ("vocab.txt", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json")
#: pooling modes, in the order sentence-transformers concatenates them
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
#: the older boolean keys of ``1_Pooling/config.json``, per mode
_LEGACY_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
#: the module classes upop understands, by class name (the last part of a module's ``type``)
SUPPORTED_MODULES = ("Transformer", "Pooling", "Normalize")

log = logging.getLogger("upop")


@dataclasses.dataclass(frozen=True)
class Pooling:
    """How token states become a sentence embedding: ``modes`` (concatenated in that order), then
    L2 normalisation when ``normalize``."""

    modes: tuple[str, ...] = ("mean",)
    normalize: bool = False

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in POOLING_MODES]
        if not self.modes or bad:
            raise UnsupportedModelError(f"pooling modes {show(self.modes)} are not supported; each must be one of "
                                        f"{', '.join(POOLING_MODES)}")

    def describe(self) -> str:
        """E.g. ``"mean + normalize"``."""
        return " + ".join(self.modes) + (" + normalize" if self.normalize else "")

    def embed(self, last_hidden_state: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, L, D) token states and (B, L) mask of real tokens -> (B, len(modes) x D), as
        sentence-transformers computes it: ``mean`` over the real tokens, ``cls`` the first real
        token, ``max`` over the real tokens, ``mean_sqrt_len_tokens`` the sum over sqrt(count),
        ``weightedmean`` weighted by position, ``lasttoken`` the last real token."""
        tokens = last_hidden_state
        mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device) if attention_mask is None \
            else attention_mask.to(tokens.device)
        parts = [_pool(mode, tokens, mask) for mode in self.modes]
        out = torch.cat(parts, dim=-1)
        return F.normalize(out, p=2, dim=-1) if self.normalize else out


def _pool(mode: str, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One pooling mode (see :meth:`Pooling.embed`); sums in float32 for half-precision states."""
    acc = torch.float32 if tokens.dtype in (torch.float16, torch.bfloat16) else tokens.dtype
    m = mask.unsqueeze(-1).to(acc)
    if mode == "cls":
        first = mask.to(torch.int).argmax(dim=1)
        return tokens[torch.arange(tokens.shape[0], device=tokens.device), first]
    if mode == "lasttoken":
        seen, last = mask.flip(1).max(1)
        last = torch.where(seen == 0, torch.full_like(last, tokens.shape[1] - 1), last)  # none: position 0
        index = tokens.shape[1] - 1 - last
        return (tokens * mask.unsqueeze(-1).to(tokens.dtype))[torch.arange(tokens.shape[0], device=tokens.device), index]
    if mode == "max":
        return tokens.masked_fill(mask.unsqueeze(-1) == 0, float("-inf")).max(dim=1).values
    if mode == "weightedmean":
        start = mask.to(torch.int32).argmax(dim=1).view(-1, 1, 1)  # left padding: weights start at the first token
        weights = torch.arange(1, tokens.shape[1] + 1, device=tokens.device, dtype=acc).view(1, -1, 1) - start
        total = (tokens.to(acc) * m * weights).sum(1)
        return (total / (m * weights).sum(1).clamp_min(1e-9)).to(tokens.dtype)
    total = (tokens.to(acc) * m).sum(1)
    count = m.sum(1).clamp_min(1e-9)
    return (total / (count if mode == "mean" else count.sqrt())).to(tokens.dtype)


@dataclasses.dataclass(frozen=True)
class Module:
    """One entry of ``modules.json``: its class name and its folder (``""``: the model folder)."""

    kind: str
    path: str


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """A sentence-transformers folder as upop reads it."""

    folder: Path
    modules: tuple[Module, ...]
    pooling: Pooling
    #: ``sentence_bert_config.json``'s ``max_seq_length`` (sentences are cut there), or None
    max_length: int | None = None

    def module_dirs(self) -> list[str]:
        """The module folders (``1_Pooling``...) a copy of the pipeline holds."""
        return [m.path for m in self.modules if m.path]

    def files(self) -> list[str]:
        """Relative paths of the pipeline's data files present in :attr:`folder`: the top-level
        files, the tokenizer files and the JSON files of each module folder."""
        names = [n for n in (*PIPELINE_FILES, *TOKENIZER_FILES) if (self.folder / n).is_file()]
        for sub in self.module_dirs():
            d = self.folder / sub
            if d.is_dir():
                names += [f"{sub}/{f.name}" for f in sorted(d.glob("*.json")) if f.is_file() and not f.is_symlink()]
        return names


def is_sentence_transformers(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a local folder with a ``modules.json``."""
    return bool(folder) and (Path(folder) / MODULES_FILE).is_file()


def read_pipeline(folder: str | os.PathLike) -> Pipeline:
    """The :class:`Pipeline` of a sentence-transformers folder; one-line errors for a module upop
    does not support (a ``Dense`` layer...), a module folder outside the model folder, or a
    damaged file."""
    folder = Path(folder)
    where = show(str(folder / MODULES_FILE))
    data = read_json(folder / MODULES_FILE)
    if not isinstance(data, list) or not data:
        raise CheckpointError(f"{where}: not a non-empty list of modules")
    modules = tuple(_module(entry, i, where) for i, entry in enumerate(data))
    kinds = [m.kind for m in modules]
    if kinds[0] != "Transformer" or modules[0].path or kinds.count("Transformer") != 1:
        raise UnsupportedModelError(f"{where}: modules {show(kinds)} do not start with the model folder's "
                                    "Transformer (path ''); upop reads the transformer at the top of the folder")
    if kinds.count("Pooling") != 1 or kinds[1:2] != ["Pooling"]:
        raise UnsupportedModelError(f"{where}: modules {show(kinds)}: upop supports one Pooling right after the "
                                    "Transformer")
    if "Normalize" in kinds and kinds.index("Normalize") != len(kinds) - 1:
        raise UnsupportedModelError(f"{where}: modules {show(kinds)}: upop supports Normalize only as the last module")
    modes = _pooling_modes(folder / modules[1].path)
    return Pipeline(folder, modules, Pooling(modes, "Normalize" in kinds), _max_length(folder))


def _module(entry: Any, index: int, where: str) -> Module:
    kind = entry.get("type") if isinstance(entry, dict) else None
    path = entry.get("path", "") if isinstance(entry, dict) else None
    if not isinstance(kind, str) or not isinstance(path, str):
        raise CheckpointError(f"{where}: module {index} is {show(entry, 120)}, not an object with a type and a path")
    name = kind.rpartition(".")[2]
    if name not in SUPPORTED_MODULES:
        raise UnsupportedModelError(f"{where}: module {index} is a {show(name, 60)} (type {show(kind, 120)}); upop "
                                    f"supports sentence-transformers pipelines of {', '.join(SUPPORTED_MODULES)} only")
    if path and (Path(path).name != path or path in (".", "..")):
        raise CheckpointError(f"{where}: module {index} has path {show(path, 120)}; a module folder must be a "
                              "plain folder name inside the model folder")
    return Module(name, path)


def _pooling_modes(folder: Path) -> tuple[str, ...]:
    """The modes of a Pooling module's ``config.json``: ``pooling_mode`` (a name or a list) or
    the older ``pooling_mode_*`` booleans; mean when none is set, as sentence-transformers does."""
    file = folder / "config.json"
    config = read_json(file) if file.is_file() else {}
    if not isinstance(config, dict):
        raise CheckpointError(f"{show(str(file))}: not a JSON object")
    mode = config.get("pooling_mode")
    if mode is not None:
        modes = (mode,) if isinstance(mode, str) else tuple(mode) if isinstance(mode, list) else None
        if not modes or not all(isinstance(m, str) for m in modes):
            raise CheckpointError(f"{show(str(file))}: pooling_mode {show(mode)} is not a mode name or a list of them")
        return modes
    return tuple(m for key, m in _LEGACY_KEYS.items() if config.get(key)) or ("mean",)


def _max_length(folder: Path) -> int | None:
    file = folder / "sentence_bert_config.json"
    data = read_json(file) if file.is_file() else None
    value = data.get("max_seq_length") if isinstance(data, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def model_folder(model: nn.Module) -> str:
    """The folder ``model`` was loaded from (``config._name_or_path``; empty when unknown)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # a data-parallel wrapper
        model = model.module
    config = getattr(model, "config", None)
    return str(getattr(config, "_name_or_path", "") or "")


def pipeline_of(model: nn.Module) -> Pipeline | None:
    """The :class:`Pipeline` of the sentence-transformers folder ``model`` was loaded from (with
    ``from_pretrained``, :func:`upop.models.folders.load_any` or ``upop compress --model``), else
    None: a model built in Python, or from a folder without ``modules.json``."""
    folder = model_folder(model)
    return read_pipeline(folder) if is_sentence_transformers(folder) else None


def carried_pipeline(base: str | os.PathLike) -> Pipeline | None:
    """The pipeline a compressed folder of a model from ``base`` carries over: None when ``base``
    is no local sentence-transformers folder, or (with a warning) one upop does not support."""
    if not is_sentence_transformers(base):
        return None
    try:
        return read_pipeline(base)
    except (UnsupportedModelError, CheckpointError) as exc:
        log.warning("the sentence-transformers files of %s are not carried into the compressed folder: %s", base, exc)
        return None
