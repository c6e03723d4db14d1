"""What a compressed folder may hold, and the keys of a model folder that make a library import code.

upop copies by allow-list, not deny-list. A compressed folder holds only:

- ``config.json`` with the keys the model's config class defines: for a config of class ``C``,
  the keys of ``C().to_dict()`` (a fresh config of that class: its own fields and
  ``PretrainedConfig``'s standard ones, e.g. ``architectures``, ``id2label``, ``dtype``,
  ``transformers_version``) and ``C``'s dataclass fields; a sub-config (``text_config``...) is
  filtered by the same rule with its own class (``C.sub_configs``). Added to those: the fields
  upop itself reads (:data:`UPOP_CONFIG_KEYS`) and what :mod:`upop.checkpoint.hub` writes (its own
  ``auto_map`` and ``upop_shapes``). Any other key is dropped: the class upop builds never reads it.
- ``generation_config.json`` with the keys of ``GenerationConfig().to_dict()``;
- upop's own files (plan, the safetensors weights as the variant ``model.upop.safetensors``,
  ``modeling_upop.py``, the card) and tokenizer / processor data files (JSON, vocabularies, chat
  templates: :data:`DATA_SUFFIXES`); a file of any other kind that a processor's
  ``save_pretrained`` wrote (e.g. a ``.py`` of a custom class, other weights) is dropped;
- the module folders a sentence-transformers ``modules.json`` names (``1_Pooling/``,
  ``2_Normalize/``), with their data files only (:mod:`upop.models.sentence_transformers`).

A code hook is refused, on input (:func:`refuse_code_hooks`, through which every model folder
upop loads goes) and on output (:func:`refuse_config_hooks`, :func:`refuse_folder_hooks`), in
one line naming the file and the key. A code hook is anything that makes transformers or
sentence-transformers import Python: an ``auto_map`` (other than upop's own in ``config.json``),
``custom_pipelines``, a true ``trust_remote_code``, an ``attn_implementation`` naming a Hub kernel
repository, a ``processor_class`` / ``tokenizer_class`` / ``*_processor_type`` /
``feature_extractor_type`` naming a class transformers does not define, a sentence-transformers
``modules.json`` entry whose ``type`` is outside ``sentence_transformers.`` (or a module's
``activation_function`` outside ``torch.``), and a ``custom_generate/`` folder (transformers runs
its ``generate.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import transformers

from upop.errors import CheckpointError, show

NO_CODE = "upop never runs code from model folders"
NO_HOOKS = "upop never writes a key that makes a library import code into a compressed folder"

#: fields upop's own code reads from a (sub-)config: BLIP's [ENC] token and NLVR layout
UPOP_CONFIG_KEYS = frozenset({"enc_token_id", "nlvr_enc_token_id", "nlvr_merge_from"})
#: JSON files of a model folder that transformers or sentence-transformers read
HOOK_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
              "processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
              "audio_tokenizer_config.json", "feature_extractor_config.json", "image_processor_config.json",
              "chat_template.json", "modules.json", "config_sentence_transformers.json",
              "sentence_bert_config.json")
#: keys whose value names a class that transformers resolves by name
CLASS_KEYS = frozenset({"processor_class", "tokenizer_class", "image_processor_type", "feature_extractor_type",
                        "video_processor_type", "image_processor_class", "feature_extractor_class"})
#: kinds of files a tokenizer or processor saves: data, never code
DATA_SUFFIXES = frozenset({".json", ".txt", ".model", ".jinja", ".tiktoken"})
_PYTHON_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: keys whose object maps user-chosen names (class labels), not settings: not searched for hooks
_NAME_MAPS = frozenset({"label2id", "id2label"})


# ---- finding code hooks in parsed JSON ------------------------------------------------------------

def _walk(value: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], str, Any]]:
    """Every ``(path to the object, key, value)`` of the objects nested in ``value``."""
    stack = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                yield where, str(key), child
                if key not in _NAME_MAPS:
                    stack.append((child, (*where, str(key))))
        elif isinstance(item, list):
            stack.extend((child, (*where, str(i))) for i, child in enumerate(item))


def is_transformers_class(name: Any) -> bool:
    """Whether ``name`` names a class transformers defines (``...Fast`` tokenizers included)."""
    if not isinstance(name, str) or not _PYTHON_NAME.fullmatch(name):
        return False
    return any(isinstance(getattr(transformers, n, None), type) for n in (name, name.removesuffix("Fast")))


def _hook(where: tuple[str, ...], key: str, value: Any) -> str | None:
    """What makes ``key`` (under ``where``) a code hook, as ``has ..., which ...``; None if it is not one."""
    at = ".".join((*where, key))
    if key == "auto_map":
        return (f"has an auto_map{'' if not where else f' (at {at})'}, which makes transformers import Python code "
                "shipped with the folder")
    if key == "custom_pipelines" and value:
        return f"has {at}, which makes transformers' pipeline() import the pipeline code it names"
    if key == "trust_remote_code" and value not in (False, None):
        return f"sets {at} to {show(value, 40)}, which makes the library import Python code shipped with the folder"
    if key in ("attn_implementation", "_attn_implementation") and isinstance(value, str) and "/" in value:
        return f"has {at} {show(value, 80)}, a Hub kernel repository whose code transformers would import"
    if key in CLASS_KEYS and value is not None and not is_transformers_class(value):
        return (f"has {at} {show(value, 80)}, which is not a class transformers defines, so only code from "
                "elsewhere could load it")
    return None


def find_hook(data: Any, *, own_auto_map: bool = False) -> str | None:
    """The first code hook in parsed JSON ``data``, as a message fragment, else None.

    ``own_auto_map``: the top-level ``auto_map`` of ``data`` is upop's own (checked elsewhere)."""
    for where, key, value in _walk(data):
        if own_auto_map and not where and key == "auto_map":
            continue
        found = _hook(where, key, value)
        if found is not None:
            return found
    return None


def _module_hook(entry: Any, index: int) -> str | None:
    """A sentence-transformers ``modules.json`` entry that is not a ``sentence_transformers`` class."""
    kind = entry.get("type") if isinstance(entry, dict) else None
    if isinstance(kind, str) and kind.startswith("sentence_transformers.") and _dotted(kind):
        return None
    return (f"has module {index} of type {show(kind, 80)}, a class outside sentence_transformers. that "
            "sentence-transformers would import")


def _dotted(name: str) -> bool:
    return all(_PYTHON_NAME.fullmatch(part) for part in name.split("."))


# ---- input: a model folder -------------------------------------------------------------------------

def refuse_code_hooks(folder: Path, config: dict[str, Any], read_json) -> None:
    """Refuse (one line naming the file and the key) a model folder with any code hook.

    ``config`` is its parsed ``config.json``, whose top-level ``auto_map`` the caller has already
    checked (upop's own passes); ``read_json`` parses a file with upop's size and depth limits."""
    for name in HOOK_FILES:
        data = config if name == "config.json" else _json_if_present(folder / name, read_json)
        problem = find_hook(data, own_auto_map=name == "config.json")
        if problem is None and name == "modules.json":
            problem = _modules_hook(folder, data, read_json)
        if problem is not None:
            raise CheckpointError(f"{show(folder)}: {name} {problem}; {NO_CODE}")
    if (folder / "custom_generate").exists():
        raise CheckpointError(f"{show(folder)}: has a custom_generate folder, whose generate.py transformers imports "
                              f"in place of its own generate(); {NO_CODE}")


def _json_if_present(file: Path, read_json) -> Any:
    return read_json(file) if file.is_file() else None


def _modules_hook(folder: Path, modules: Any, read_json) -> str | None:
    """A foreign module type in ``modules.json``, or a code hook in a module folder's JSON files."""
    if modules is None:
        return None
    if not isinstance(modules, list):
        return f"is a JSON {type(modules).__name__}, not the list of modules sentence-transformers expects"
    for index, entry in enumerate(modules):
        problem = _module_hook(entry, index)
        if problem is not None:
            return problem
        sub = entry.get("path")
        if isinstance(sub, str) and sub and (folder / sub).resolve().is_relative_to(folder.resolve()):
            for file in sorted((folder / sub).glob("*.json")) if (folder / sub).is_dir() else ():
                data = read_json(file)
                problem = find_hook(data) or _activation_hook(data)
                if problem is not None:
                    return f"names module folder {show(sub, 80)}, whose {file.name} {problem}"
    return None


def _activation_hook(data: Any) -> str | None:
    """A sentence-transformers module's ``activation_function`` is imported by name: torch only."""
    value = data.get("activation_function") if isinstance(data, dict) else None
    if value is None or (isinstance(value, str) and value.startswith("torch.") and _dotted(value)):
        return None
    return f"has activation_function {show(value, 80)}, which sentence-transformers imports and is not a torch one"


# ---- output: what a compressed folder may hold -----------------------------------------------------

def refuse_config_hooks(config: transformers.PretrainedConfig, what: str = "the model's config",
                        is_own: Callable[[dict[str, Any]], bool] = lambda data: False) -> None:
    """Refuse to save a model whose (Python-made) config carries a code hook; an ``auto_map`` is
    accepted only when ``is_own`` says it is upop's own (it is rewritten on save)."""
    data = config.to_dict()
    problem = find_hook(data, own_auto_map="auto_map" in data and is_own(data))
    if problem is not None:
        raise CheckpointError(f"{what} {problem}; {NO_HOOKS} (delete the key from the config first)")


def refuse_folder_hooks(folder: Path, read_json, what: str = "the compressed folder's") -> None:
    """Refuse a code hook in the JSON files of a folder being written that a library reads
    settings from (:data:`HOOK_FILES`, other than ``config.json``, checked as a config): the
    tokenizer / processor files a processor saved or that were copied from the base model, and a
    carried ``modules.json`` with its module folders (types and module configs as on input)."""
    for name in HOOK_FILES[1:]:
        file = folder / name
        data = read_json(file) if file.is_file() else None
        problem = find_hook(data)
        if problem is None and name == "modules.json":
            problem = _modules_hook(folder, data, read_json)
        if problem is not None:
            raise CheckpointError(f"{what} {file.name} {problem}; {NO_HOOKS}")


def drop_unknown_files(folder: Path, own: set[str], module_dirs: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """Delete from ``folder`` (upop's temporary folder being written) every file that is neither
    one of ``own`` nor a tokenizer / processor data file, and every folder but ``module_dirs``
    (a sentence-transformers pipeline's module folders, of which only the data files stay);
    returns the names dropped."""
    dropped = []
    for path in sorted(folder.iterdir()):
        if path.name in own or (path.is_file() and not path.is_symlink() and path.suffix in DATA_SUFFIXES):
            continue
        if path.name in module_dirs and path.is_dir() and not path.is_symlink():
            dropped += [f"{path.name}/{name}" for name in drop_unknown_files(path, set())]
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        dropped.append(path.name)
    return dropped


@functools.lru_cache(maxsize=None)
def config_keys(cls: type) -> frozenset[str]:
    """The keys a config of class ``cls`` defines (see the module docstring)."""
    keys = set(UPOP_CONFIG_KEYS)
    for klass in (transformers.PretrainedConfig, cls):
        if dataclasses.is_dataclass(klass):
            keys |= {f.name for f in dataclasses.fields(klass) if not f.name.startswith("_")}
        keys |= _fresh_keys(klass)
    keys |= {"model_type", "transformers_version", "architectures", "dtype"}
    return frozenset(k for k in keys if not k.startswith("_"))


def _fresh_keys(cls: type) -> set[str]:
    """The keys of ``cls().to_dict()`` (transformers' warnings about default values silenced);
    empty for a class that cannot be built without arguments."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return set(cls().to_dict())
    except Exception:  # noqa: BLE001 - a class without defaults: its dataclass fields are the rule
        return set()
    finally:
        hf_logging.set_verbosity(was)


def known_config(data: dict[str, Any], cls: type) -> dict[str, Any]:
    """``data`` (a ``config.json`` of a config of class ``cls``) with only the keys ``cls``
    defines; each sub-config filtered by its own class."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    allowed = config_keys(cls)
    subs = getattr(cls, "sub_configs", None) or {}
    kept = {}
    for key, value in data.items():
        if key not in allowed:
            continue
        sub = subs.get(key)
        if isinstance(value, dict) and sub is not None:
            if not (isinstance(sub, type) and issubclass(sub, transformers.PretrainedConfig)):
                sub = CONFIG_MAPPING.get(value.get("model_type")) if value.get("model_type") in CONFIG_MAPPING \
                    else None
            value = known_config(value, sub) if sub is not None else value
        kept[key] = value
    return kept


def known_generation_config(data: dict[str, Any]) -> dict[str, Any]:
    """``generation_config.json`` with only the keys ``GenerationConfig`` defines."""
    allowed = set(transformers.GenerationConfig().to_dict())
    return {k: v for k, v in data.items() if k in allowed}
