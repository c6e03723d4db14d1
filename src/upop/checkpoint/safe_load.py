"""Reading model folders without running code from them, and checking what they hold.

upop never executes code that comes with a model folder (or a Hub repository: only its data
files are fetched, :func:`local_folder`). Before transformers sees a folder,
:func:`check_folder` reads its JSON files itself and refuses an ``auto_map`` or a model type that
only the folder's own Python defines, and every other key that would make transformers or
sentence-transformers import code (:mod:`upop.checkpoint.allow_list`), so no code path can reach the "run
the custom code? [y/N]" prompt (every call also passes ``trust_remote_code=False``). Weights
come from safetensors files only (:func:`weight_files` for a dense folder, :func:`compressed_weight_files`
for a compressed one); :func:`scan_safetensors` and :func:`check_dtypes` refuse tensors that would
otherwise be cast silently or that hold NaN/Inf. Every refusal is a one-line
:class:`CheckpointError` naming the folder, file or tensor.

A compressed folder stores its weights as the safetensors *variant* ``upop``
(:data:`upop.checkpoint.hub.VARIANT`): :data:`UPOP_WEIGHTS`, or shards and :data:`UPOP_INDEX`,
the names ``save_pretrained(..., variant="upop")`` writes. A dense class's ``from_pretrained``
looks for ``model.safetensors``, finds none and raises, instead of building a dense model whose
pruned layers it would re-initialise. Folders of earlier upop versions hold ``model.safetensors``
and still load.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import transformers
from safetensors import SafetensorError, safe_open
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from upop.checkpoint.hub import VARIANT
from upop.errors import CheckpointError, show

#: upop's JSON files (plan, config, tokenizer/processor configs, shard index) are small; larger or
#: deeper ones are refused before they can exhaust memory or the parser's recursion
MAX_JSON_BYTES = 64 * 2**20
MAX_JSON_DEPTH = 64

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"


def variant_name(name: str, variant: str = VARIANT) -> str:
    """``name`` with ``variant`` before its last suffix, as transformers names a variant's files
    (``model.safetensors`` -> ``model.upop.safetensors``)."""
    stem, suffix = name.rsplit(".", 1)
    return f"{stem}.{variant}.{suffix}"


#: a compressed folder's weights, or the index of its shards (``model.upop-00001-of-0000N.safetensors``)
UPOP_WEIGHTS = variant_name(SAFE_WEIGHTS)
UPOP_INDEX = variant_name(SAFE_INDEX)
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
#: what is fetched of a Hub model: configs, safetensors weights, tokenizer vocabularies
HUB_FILES = ("*.json", "*.safetensors", "*.txt", "*.model")
NO_CODE = "upop never runs code from model folders"


def reason(exc: BaseException) -> str:
    """The first line of an exception's message, escaped for a one-line error."""
    text = str(exc).strip()
    return show(text.splitlines()[0] if text else type(exc).__name__, 160)


def read_json(file: Path) -> Any:
    """Parse a JSON file of a model or checkpoint folder, refusing (one line) a file that is too
    big, not UTF-8, not JSON or nested deeper than :data:`MAX_JSON_DEPTH`."""
    try:
        size = file.stat().st_size
        if size > MAX_JSON_BYTES:
            raise CheckpointError(f"{show(file)}: {size:,} bytes, more than the {MAX_JSON_BYTES:,} bytes a JSON "
                                  "file of a model folder may have")
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{show(file)}: not UTF-8 text ({reason(exc)})") from None
    except OSError as exc:
        raise CheckpointError(f"{show(file)}: cannot be read ({reason(exc)})") from None
    try:
        data = json.loads(text)
        too_deep = not _depth_within(data, MAX_JSON_DEPTH)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{show(file)}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
                              ) from None
    except RecursionError:  # the parser's own guard, far deeper than the limit
        too_deep = True
    if too_deep:
        raise CheckpointError(f"{show(file)}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return data


def _depth_within(value: Any, limit: int) -> bool:
    """Whether no list/object in ``value`` is nested more than ``limit`` levels (iterative walk)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return False
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return True


def local_folder(path: str | os.PathLike) -> Path:
    """The local folder of a model: ``path`` itself, or for a Hugging Face Hub id (``org/name``)
    a snapshot of the repository's data files only (:data:`HUB_FILES`: never Python or pickles)."""
    folder = Path(path)
    if folder.is_dir():
        return folder
    if folder.exists() or not _is_repo_id(str(path)):
        problem = "not a folder" if folder.exists() else "no such folder"
        raise CheckpointError(f"cannot load model {show(path)}: {problem}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path), allow_patterns=list(HUB_FILES)))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load model {show(path)}: no such folder, and the Hugging Face Hub has no such "
                              f"model or cannot be reached ({reason(exc)})") from None


def _is_repo_id(text: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def check_folder(folder: Path) -> dict[str, Any]:
    """``config.json`` of a model folder, once nothing in the folder asks for code to be imported.

    Refused (one line naming the folder, the file and the key): no ``config.json``, one that is
    not a JSON object, an ``auto_map`` in it other than exactly the one upop writes for
    ``modeling_upop.py`` (a file upop itself never imports: :func:`upop.checkpoint.hub.check_upop_auto_map`),
    any other code hook in the JSON files transformers or sentence-transformers read
    (:func:`upop.checkpoint.allow_list.refuse_code_hooks`: ``auto_map`` in the tokenizer / processor
    configs, ``custom_pipelines``, ``trust_remote_code``, class names transformers does not
    define, foreign ``modules.json`` types...), and a ``model_type`` that neither transformers nor
    upop defines (only the folder's own Python could build such a model).

    A compressed folder records upop's own model type (``upop_<type>``, so that plain transformers
    asks for ``trust_remote_code``); the dict returned holds the dense type it stands for
    (:func:`upop.checkpoint.hub.base_model_type`), as :func:`read_config` builds it.
    """
    from upop.checkpoint.allow_list import refuse_code_hooks
    from upop.checkpoint.hub import base_model_type, check_upop_auto_map

    file = folder / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{show(folder)}: no config.json; is this a Hugging Face model folder?")
    config = read_json(file)
    if not isinstance(config, dict):
        raise CheckpointError(f"{show(file)}: a JSON {type(config).__name__}, not an object of config fields")
    check_upop_auto_map(config, show(folder))  # upop's own (never imported) passes; any other is refused
    refuse_code_hooks(folder, config, read_json)
    model_type = base_model_type(config)
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        from upop.arch import supported_model_types

        raise CheckpointError(f"{show(folder)}: config.json model_type {show(model_type, 80)} is not one transformers "
                              f"or upop defines, so the folder needs its own Python code to load; {NO_CODE} "
                              f"(supported: {', '.join(supported_model_types())})")
    return {**config, "model_type": model_type}


def read_config(folder: Path, cls: type, config_json: dict[str, Any]) -> transformers.PretrainedConfig:
    """The config of a folder, from ``config_json`` (what :func:`check_folder` returned for it), as
    ``cls`` (a model class) needs it: built by transformers' config class of its model type (never a
    class of the folder's)."""
    try:
        config = CONFIG_MAPPING[config_json["model_type"]].from_dict(dict(config_json))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{show(folder / 'config.json')}: cannot be read ({reason(exc)})") from None
    if not isinstance(config, cls.config_class):
        raise CheckpointError(f"{show(folder)}: config.json holds a {type(config).__name__} (model_type "
                              f"{show(config.model_type)}) but {cls.__name__} needs a {cls.config_class.__name__}")
    return config


def convert_command(folder: Path, cls: type) -> str:
    """A one-line Python command that rewrites a folder's ``pytorch_model.bin`` as ``model.safetensors``.

    transformers reads the pickle with ``torch.load(weights_only=True)``, which refuses anything
    but tensors, then ``save_pretrained`` writes safetensors next to it.
    """
    module = "transformers" if getattr(transformers, cls.__name__, None) is cls else cls.__module__
    where = repr(str(folder))
    return (f'python -c "import {module} as m; m.{cls.__name__}.from_pretrained({where}, use_safetensors=False)'
            f'.save_pretrained({where})"')


def weight_files(folder: Path, cls: type) -> list[Path]:
    """The safetensors files that hold a folder's weights: ``model.safetensors`` or the shards its
    index names. A folder with only ``pytorch_model.bin`` (a pickle) is refused with the command
    that converts it."""
    files = _single_or_shards(folder, SAFE_WEIGHTS, SAFE_INDEX)
    if files is not None:
        return files
    if any((folder / name).is_file() for name in PICKLE_WEIGHTS):
        raise CheckpointError(f"{show(folder)}: weights only in pytorch_model.bin, a pickle; upop loads safetensors "
                              f"only (loading a pickle can run code). Convert it once with: "
                              f"{convert_command(folder, cls)}")
    own = _present(folder, (UPOP_WEIGHTS, UPOP_INDEX))
    if own:
        raise CheckpointError(f"{show(folder)}: holds {own[0]}, the weights of a upop compressed folder, but no "
                              "upop_plan.json to rebuild its pruned widths")
    raise CheckpointError(f"{show(folder)}: no {SAFE_WEIGHTS} (upop loads weights from safetensors files only)")


def _single_or_shards(folder: Path, single: str, index: str) -> list[Path] | None:
    """``[folder / single]`` if that file exists, else the shards ``folder / index`` names if the
    index exists, else None (neither is there)."""
    if (folder / single).is_file():
        return [folder / single]
    if (folder / index).is_file():
        return shard_files(folder / index)
    return None


def _present(folder: Path, names: tuple[str, ...]) -> list[str]:
    return [name for name in names if (folder / name).is_file()]


def compressed_weight_files(folder: Path) -> list[Path]:
    """The safetensors files that hold a compressed folder's weights: :data:`UPOP_WEIGHTS` or the
    shards :data:`UPOP_INDEX` names; for a folder of an earlier upop version, ``model.safetensors``
    or the shards its index names. A folder with weights under both names is ambiguous and refused
    in one line naming both files."""
    own, dense = _present(folder, (UPOP_WEIGHTS, UPOP_INDEX)), _present(folder, (SAFE_WEIGHTS, SAFE_INDEX))
    if own and dense:
        raise CheckpointError(f"{show(folder)}: holds both {own[0]} (upop's compressed weights) and {dense[0]} "
                              f"(weights under the dense name), so which are the model's is ambiguous; keep only "
                              f"{UPOP_WEIGHTS} (or its shards and {UPOP_INDEX})")
    for single, index in ((UPOP_WEIGHTS, UPOP_INDEX), (SAFE_WEIGHTS, SAFE_INDEX)):
        files = _single_or_shards(folder, single, index)
        if files is not None:
            return files
    if any((folder / name).is_file() for name in PICKLE_WEIGHTS):
        raise CheckpointError(f"{show(folder)}: weights only in pytorch_model.bin, a pickle; upop loads safetensors "
                              f"only (loading a pickle can run code)")
    raise CheckpointError(f"{show(folder)}: no {UPOP_WEIGHTS} (upop loads weights from safetensors files only)")


def shard_files(index: Path) -> list[Path]:
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{show(index)}: no weight_map of tensor names to shard files")
    files = []
    for name in sorted(set(weight_map.values())):
        if Path(name).name != name or not name.endswith(".safetensors"):
            raise CheckpointError(f"{show(index)}: shard {show(name, 80)} is not a .safetensors file in the same "
                                  "folder")
        if not (index.parent / name).is_file():
            raise CheckpointError(f"{show(index)}: shard {show(name, 80)} is missing")
        files.append(index.parent / name)
    return files


def _tensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a safetensors file, one at a time; one-line error for a damaged file."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            for key in list(handle.keys()):
                try:
                    tensor = handle.get_tensor(key)
                except (SafetensorError, OSError, RuntimeError, TypeError) as exc:
                    raise CheckpointError(f"{show(file)}: tensor {show(key, 120)} cannot be read ({reason(exc)})"
                                          ) from None
                yield key, tensor
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{show(file)}: cannot be read as a safetensors file ({reason(exc)})") from None


def scan_safetensors(files: list[Path]) -> dict[str, tuple[Path, torch.dtype]]:
    """Read every tensor of ``files`` once: a damaged file or a float tensor with NaN/Inf is a
    one-line error. Returns each tensor's file and dtype, for :func:`check_dtypes`."""
    found: dict[str, tuple[Path, torch.dtype]] = {}
    for file in files:
        for key, tensor in _tensors(file):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = tensor.numel() - int(torch.isfinite(tensor).sum())
                raise CheckpointError(f"{show(file)}: tensor {show(key, 120)} has {bad} NaN/Inf value(s) of "
                                      f"{tensor.numel()}; weights must be finite numbers")
            found[key] = (file, tensor.dtype)
    return found


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "integer"


def check_dtypes(found: dict[str, tuple[Path, torch.dtype]], expected: dict[str, torch.Tensor]) -> None:
    """Refuse a stored tensor whose kind (bool, integer, float) differs from the model's tensor of
    the same name: loading would cast it silently (``True`` -> 1.0, weights rounded to ints)."""
    for key, (file, dtype) in found.items():
        own = expected.get(key)
        if own is not None and _kind(own.dtype) != _kind(dtype):
            raise CheckpointError(f"{show(file)}: tensor {show(key, 120)} is {dtype} but the model's is {own.dtype}; "
                                  f"upop does not cast {_kind(dtype)} values to {_kind(own.dtype)} (a wrong or "
                                  "damaged weights file)")


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' own loading report off while upop loads (upop reports problems itself, in
    one line); the previous verbosity is restored."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(was)
