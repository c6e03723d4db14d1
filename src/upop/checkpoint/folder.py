"""Compressed checkpoints: a Hugging Face-style folder plus the pruning plan.

    out/config.json          the dense model's config (plus the two Hub fields named below)
    out/upop_plan.json       versioned, sorted JSON: kept units per group, provenance, ratios
    out/model.upop.safetensors  the compressed weights (no pickle: loading never executes code),
                             under the model's own parameter names; or shards and their index. The
                             safetensors variant ``upop`` (:data:`WEIGHTS_FILE`), so that a dense
                             class's ``from_pretrained(out, ignore_mismatched_sizes=True)`` finds no
                             ``model.safetensors`` and raises instead of re-initialising the pruned
                             layers; ``UPopX.from_pretrained`` and :func:`load_compressed` read it.
                             A folder of an earlier upop version (``model.safetensors``) still loads.
    out/modeling_upop.py     generated, torch/transformers-only code that rebuilds the pruned
                             widths for ``AutoModel*.from_pretrained(out, trust_remote_code=True)``
                             without upop; config.json then also has its ``auto_map`` and
                             ``upop_shapes`` (:mod:`upop.checkpoint.hub`). upop itself never imports it.
    out/<tokenizer / processor files>
    out/modules.json, 1_Pooling/...  a sentence-transformers base folder's pipeline files, carried over
                             (:mod:`upop.models.sentence_transformers`)

:func:`save_compressed` writes the folder into a temporary sibling and renames it into place, so
a killed save never leaves a half-written checkpoint. ``save_pretrained`` of a pruned or loaded
compressed model (what ``Trainer.save_model`` calls) writes the same folder: the plan sets that
model's ``save_pretrained`` to also write ``upop_plan.json`` (see :func:`upop.pruning.prune.apply_plan`).
"""

from __future__ import annotations

import os
import shutil
from importlib import import_module
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model
from torch import nn

from upop.checkpoint.safe_load import (UPOP_WEIGHTS, check_dtypes, check_folder, compressed_weight_files, local_folder,
                         quiet_transformers, read_config, read_json, reason, scan_safetensors)
from upop.checkpoint.allow_list import drop_unknown_files, refuse_folder_hooks
from upop.arch import ArchSpec, get_spec, spec_by_name
from upop.errors import CheckpointError, ConfigError, UnsupportedModelError, show
from upop.checkpoint.card import CARD_FILE, write_model_card
from upop.models.sentence_transformers import TOKENIZER_FILES, Pipeline, carried_pipeline
from upop.checkpoint.hub import MODELING_FILE, refuse_hooks, strip_hub_fields, write_hub_files
from upop.pruning.prune import PLAN_FILE, PruningPlan, apply_plan
from upop.runs.rundir import write_dir_atomic

#: the weights of a compressed folder: the safetensors variant ``upop`` (``model.upop.safetensors``)
WEIGHTS_FILE = UPOP_WEIGHTS
_PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
    "chat_template.jinja",
)
#: the files upop itself writes into a compressed folder
_OWN_FILES = {"config.json", "generation_config.json", PLAN_FILE, WEIGHTS_FILE, MODELING_FILE, CARD_FILE}


def save_compressed(model: nn.Module, out_dir: str | os.PathLike, processor=None, plan: PruningPlan | None = None) -> Path:
    """Write ``model`` (pruned by :func:`upop.prune`) as a compressed checkpoint folder.

    ``processor`` (a tokenizer, image processor or processor) is saved alongside; if omitted and
    the plan's base model is a local folder, its tokenizer/processor files are copied. The folder
    also gets ``modeling_upop.py`` and an ``auto_map`` (:mod:`upop.checkpoint.hub`), so transformers alone
    loads it with ``trust_remote_code=True``.

    Only what upop knows is written (:mod:`upop.checkpoint.allow_list`): config keys the config class
    defines, tokenizer / processor data files, upop's own files. A config, generation config or
    processor file with a key that makes a library import code (``custom_pipelines``, a foreign
    ``auto_map``...) is refused in one line and nothing is written.
    """
    plan = plan or getattr(model, "upop_plan", None)
    if plan is None:
        raise CheckpointError("this model has no pruning plan: call upop.prune(model, masks) before save_compressed")
    refuse_hooks(model)
    gen = getattr(model, "generation_config", None)
    if not getattr(model, "can_generate", lambda: False)():
        gen = None

    def fill(tmp: Path) -> None:
        model.config.save_pretrained(tmp)
        if gen is not None:
            gen.save_pretrained(tmp)
        write_hub_files(model, tmp)  # modeling_upop.py + auto_map; config keys cut to the allow-list
        (tmp / PLAN_FILE).write_text(plan.to_json())
        save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "upop_format": str(plan.format_version)})
        _save_processor(tmp, processor, plan)
        write_model_card(tmp, plan)

    return write_dir_atomic(out_dir, fill)


def _save_processor(tmp: Path, processor, plan: PruningPlan) -> None:
    """The tokenizer / processor files: ``processor``'s own, else the base model folder's
    :data:`_PROCESSOR_FILES`; and, when the base model is a local sentence-transformers folder,
    its pipeline files (:func:`_copy_pipeline`). Refused with a code hook; only data files are kept."""
    base = Path(plan.base_model) if plan.base_model and Path(plan.base_model).is_dir() else None
    if processor is not None:
        processor.save_pretrained(tmp)
    elif base is not None:
        for name in _PROCESSOR_FILES:
            src = base / name
            if src.is_file():
                shutil.copy2(src, tmp / name)
    pipeline = carried_pipeline(base) if base is not None else None
    dirs = _copy_pipeline(tmp, pipeline) if pipeline is not None else []
    refuse_folder_hooks(tmp, read_json)
    drop_unknown_files(tmp, _OWN_FILES, set(dirs))


def _copy_pipeline(tmp: Path, pipeline: Pipeline) -> list[str]:
    """Copy a sentence-transformers pipeline's data files (``modules.json``, its configs, the
    module folders' JSON, the tokenizer files the processor did not write) into ``tmp``, so
    ``SentenceTransformer(folder, trust_remote_code=True)`` pools and normalises as the base model
    did; every module folder is created (``2_Normalize/`` may be empty). Returns the module folders."""
    for rel in pipeline.files():
        dest = tmp / rel
        if rel in TOKENIZER_FILES and dest.exists():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(pipeline.folder / rel, dest)
    for sub in pipeline.module_dirs():
        (tmp / sub).mkdir(exist_ok=True)
    return pipeline.module_dirs()


def read_plan(path: str | os.PathLike) -> PruningPlan:
    """The :class:`PruningPlan` of a compressed checkpoint folder (size-, depth- and type-checked)."""
    file = Path(path) / PLAN_FILE
    if not file.is_file():
        raise CheckpointError(f"{show(path)}: no {PLAN_FILE}; is this a upop compressed checkpoint?")
    return PruningPlan.from_dict(read_json(file), source=str(file))


def project_class(name: str):
    """A model class defined in this project (a family's :class:`~upop.arch.ModelClass` with
    ``project``), by name."""
    from upop.arch import model_class_info

    info = model_class_info(name)
    if info is None or info.project is None:
        raise CheckpointError(f"model class {show(name, 80)} is not available in this version of transformers or upop")
    module, cls = info.project.split(":")
    return getattr(import_module(module), cls)


def model_class(name: str):
    """Resolve a model class name to a class, only among the classes the registry declares."""
    from upop.arch import known_classes

    known = known_classes()
    if name not in known:
        raise CheckpointError(f"model class {show(name, 80)} is not one upop knows; known: {', '.join(sorted(known))}")
    cls = getattr(transformers, name, None)
    return cls if cls is not None else project_class(name)


def load_compressed(path: str | os.PathLike, device: str | torch.device | None = None,
                    dtype: torch.dtype | str | None = None, spec: ArchSpec | None = None, *,
                    torch_dtype: torch.dtype | str | None = None, attn_implementation: str | None = None,
                    device_map: str | int | torch.device | dict | None = None,
                    trust_remote_code: bool = False) -> nn.Module:
    """Load a compressed checkpoint folder: same class as the dense model, in eval mode.

    ``path`` is a local folder or a Hugging Face Hub id (``org/name``), fetched like
    ``from_pretrained`` does (the local cache first; ``HF_HUB_OFFLINE=1`` uses only the cache),
    data files only: configs, safetensors and vocabularies, never Python.

    Everything is checked before a model is built: the plan, that nothing in the folder asks for
    its own code (upop never runs it), that the plan's class and model type are the ones
    ``config.json`` records, and every stored tensor (readable, finite). The model is then built
    from ``config.json`` (no weights), shaped by the plan with the same slicing code as
    :func:`upop.prune`, and the weights are loaded strictly (names, shapes and dtype kinds). A
    model pruned with a spec of your own needs that spec: pass it as ``spec`` (or
    ``register_spec`` it first).

    The other keywords mean what they mean for ``from_pretrained``: ``dtype`` (alias
    ``torch_dtype``) a float ``torch.dtype``, its name, or ``"auto"`` (the ``dtype`` that
    ``config.json`` records, else the stored weights'); default float32. ``attn_implementation``
    e.g. ``"eager"`` or ``"sdpa"`` (refused when the class does not support it).
    ``device_map``: a device (``"cpu"``, ``"cuda:1"``, ``0``, a ``torch.device``), ``"auto"`` /
    ``"balanced"`` / ``"balanced_low_0"`` / ``"sequential"`` (placed over the GPUs and the CPU by
    accelerate), or a dict of module name -> device; ``device`` is the older spelling of a single
    device. ``trust_remote_code`` may only be False.
    """
    if trust_remote_code:
        raise ConfigError("trust_remote_code=True is not accepted: upop never runs code from model folders; "
                          "load_compressed builds only transformers' and upop's own classes")
    dtype = _check_dtype(dtype if dtype is not None else torch_dtype)
    if device is not None and device_map is not None:
        raise ConfigError(f"device {show(device)} and device_map {show(device_map)} both given; give one")
    path = local_folder(path)  # a folder, or a Hub id: its data files from the cache or the Hub (never code)
    plan = read_plan(path)
    config_json = check_folder(path)
    _check_config_matches_plan(config_json, plan, path)
    cls = model_class(plan.model_class)
    files = weight_files(path)
    found = scan_safetensors(files)
    config = read_config(path, cls, config_json)
    strip_hub_fields(config)  # the Hub files' fields; load_compressed never imports modeling_upop.py
    model = _build(cls, config, path)
    if attn_implementation is not None:
        _set_attention(model, attn_implementation)
    apply_plan(model, plan, spec=_plan_spec(plan, spec, model, path))
    names = stored_names(model, found)
    check_dtypes({names.get(k, k): v for k, v in found.items()}, model.state_dict())
    target = _resolve_dtype(dtype, config_json, found)
    if target is not None:
        _cast(model, target)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update({names.get(k, k): t for k, t in load_file(str(file)).items()})
        except (SafetensorError, OSError) as exc:  # changed since it was scanned
            raise CheckpointError(f"{show(file)}: cannot be read ({reason(exc)})") from None
    _load_strict(model, state, files[0] if len(files) == 1 else path)
    return _place(model.eval(), device_map if device_map is not None else (device or "cpu"))


def weight_files(path: Path) -> list[Path]:
    """``model.upop.safetensors``, or the shards its index names (``save_pretrained`` of a large
    model); ``model.safetensors`` (or its shards) in a folder of an earlier upop version; both is
    refused (:func:`upop.checkpoint.safe_load.compressed_weight_files`)."""
    return compressed_weight_files(path)


def stored_names(model: nn.Module, found: dict[str, Any]) -> dict[str, str]:
    """Stored tensor name -> the model's parameter name, for a folder whose weights transformers
    saved under its original (older) names (``save_pretrained(..., save_original_format=True)``,
    e.g. ViT's ``encoder.layer.N.attention.attention.query``). Empty when the names already match;
    only pure renamings are mapped (a name that is not one stays and is refused as unexpected)."""
    own = model.state_dict()
    if all(k in own for k in found):
        return {}
    try:
        from transformers.core_model_loading import revert_weight_conversion

        original = revert_weight_conversion(model, dict(own))
    except (ImportError, AttributeError, KeyError, RuntimeError, TypeError, ValueError):
        return {}
    by_tensor = {id(t): k for k, t in own.items()}
    return {old: by_tensor[id(t)] for old, t in original.items() if id(t) in by_tensor and old != by_tensor[id(t)]}


def _cast(model: nn.Module, dtype: torch.dtype) -> None:
    """``model.to(dtype)``, keeping the modules the class lists in ``_keep_in_fp32_modules`` in
    float32 as ``from_pretrained`` does."""
    model.to(dtype)
    model.config.dtype = dtype  # what the config of a from_pretrained model records
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ()) | set(
        getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if keep and dtype in (torch.float16, torch.bfloat16):
        for name, module in model.named_modules():
            if any(k in name for k in keep):
                module.float()


_AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _float_dtype(value: Any) -> torch.dtype | None:
    """``value`` (a ``torch.dtype`` or its name, with or without ``torch.``) as a float dtype, else None."""
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else None


def _check_dtype(dtype: Any) -> torch.dtype | str | None:
    """A ``dtype`` argument: None, ``"auto"`` or a float dtype (given as such or by name)."""
    if dtype is None or dtype == "auto":
        return dtype
    resolved = _float_dtype(dtype)
    if resolved is None:
        raise ConfigError(f"dtype {show(dtype)} is not a floating-point torch dtype; use e.g. torch.bfloat16, "
                          "'float16', 'float32' or 'auto'")
    return resolved


def _resolve_dtype(dtype: torch.dtype | str | None, config: dict[str, Any],
                  found: dict[str, tuple[Path, torch.dtype]]) -> torch.dtype | None:
    """The dtype to load in: ``"auto"`` is the one ``config.json`` records (``dtype`` or
    ``torch_dtype``), else the first stored float tensor's, like ``from_pretrained``."""
    if dtype != "auto":
        return dtype
    for key in ("dtype", "torch_dtype"):
        recorded = _float_dtype(config.get(key)) if isinstance(config.get(key), str) else None
        if recorded is not None:
            return recorded
    return next((d for _, d in found.values() if d.is_floating_point), None)


def _set_attention(model: nn.Module, implementation: str) -> None:
    """Switch ``model`` to ``implementation`` (``from_pretrained``'s ``attn_implementation``), or a
    one-line ConfigError when its class does not support it."""
    if not isinstance(implementation, str):
        raise ConfigError(f"attn_implementation {show(implementation)} is not a name; use e.g. 'eager' or 'sdpa'")
    before = model.config._attn_implementation
    try:
        with quiet_transformers():
            model.set_attn_implementation(implementation)
    except (ValueError, ImportError) as exc:
        raise ConfigError(f"attn_implementation {show(implementation)} is not available for "
                          f"{type(model).__name__} ({reason(exc)})") from None
    if implementation != before and model.config._attn_implementation == before:  # classes that cannot switch warn
        raise ConfigError(f"attn_implementation {show(implementation)} is not supported by {type(model).__name__} "
                          f"(it uses {show(model.config._attn_implementation)})")


def _place(model: nn.Module, device_map: Any) -> nn.Module:
    """Put ``model`` where ``device_map`` says (``from_pretrained``'s meanings): one device, an
    automatic map computed by accelerate, or a dict of module name -> device."""
    if isinstance(device_map, str) and device_map in _AUTO_MAPS:
        device_map = _auto_map(model, device_map)
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if "disk" in devices:
            raise ConfigError(f"device_map {show(device_map)} offloads to disk, which load_compressed does not do; "
                              "place the model on GPUs and the CPU only")
        if len(devices) > 1:
            from accelerate import dispatch_model

            try:
                model = dispatch_model(model, device_map=device_map)
            except (ValueError, KeyError, RuntimeError) as exc:
                raise ConfigError(f"device_map {show(device_map)} cannot place this model ({reason(exc)})") from None
            model.hf_device_map = device_map
            return model
        device_map = devices.pop() if devices else "cpu"
    try:
        return model.to(torch.device(device_map))
    except (RuntimeError, TypeError, AssertionError) as exc:
        raise ConfigError(f"device_map {show(device_map)} is not a device, a dict or one of "
                          f"{', '.join(_AUTO_MAPS)} ({reason(exc)})") from None


def _auto_map(model: nn.Module, strategy: str) -> dict[str, Any]:
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory, get_max_memory

    no_split = list(getattr(model, "_no_split_modules", None) or ())
    if strategy == "sequential":
        memory = get_max_memory()
    else:
        memory = get_balanced_memory(model, no_split_module_classes=no_split, low_zero=strategy == "balanced_low_0")
    return infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split)


def _check_config_matches_plan(config: dict[str, Any], plan: PruningPlan, path: Path) -> None:
    """The plan's model type and class are the ones ``config.json`` records (its ``architectures``,
    when present; the config class is checked when the model is built)."""
    if config["model_type"] != plan.model_type:
        raise CheckpointError(f"{show(path)}: config model_type {show(config['model_type'])} does not match the "
                              f"plan's {show(plan.model_type, 80)}")
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and plan.model_class not in archs:
        raise CheckpointError(f"{show(path)}: the plan's model_class {show(plan.model_class, 80)} is not the class "
                              f"config.json records (architectures {show(archs, 120)})")


def _build(cls: type, config: transformers.PretrainedConfig, path: Path) -> nn.Module:
    """``cls(config)``, with a damaged config (sizes of the wrong type, ...) as a one-line error."""
    try:
        return cls(config)
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, RuntimeError) as exc:
        raise CheckpointError(f"{show(path / 'config.json')}: cannot build a {cls.__name__} from it "
                              f"({reason(exc)})") from None


def _plan_spec(plan: PruningPlan, spec: ArchSpec | None, model: nn.Module, path: Path) -> ArchSpec:
    """The spec that replays the plan: the given one (it must be the plan's) or the registered one."""
    if spec is not None:
        if plan.spec and spec.name != plan.spec:
            raise CheckpointError(f"{show(path)}: the plan was made with spec {show(plan.spec, 80)}, not the given "
                                  f"{show(spec.name, 80)}")
        return spec
    try:
        return spec_by_name(plan.spec) if plan.spec else get_spec(model)
    except UnsupportedModelError as exc:
        raise CheckpointError(f"{show(path)}: {exc}; a model pruned with your own spec loads with "
                              "load_compressed(path, spec=your_spec) or after register_spec(your_spec)") from None


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], file: Path) -> None:
    """Load ``state`` into ``model``: every tensor known, of the plan's shape, and every tensor of
    the model given by the file. Tied tensors (one storage under several names) are stored once,
    so a group of them needs one member stored; a group with none is missing like any other
    tensor (the model would keep its random initialisation). Persistent buffers are in
    ``state_dict`` and so must be stored too; non-persistent ones are not part of it."""
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise CheckpointError(f"{show(file)}: unexpected tensor {show(unexpected[0], 120)} (and "
                              f"{len(unexpected) - 1} more) for this plan")
    for key, tensor in state.items():
        if tuple(own[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{show(file)}: tensor {show(key, 120)} has shape {tuple(tensor.shape)} but the "
                                  f"plan gives {tuple(own[key].shape)}")
    missing = [key for group in tied_groups(model) if not any(k in state for k in group) for key in group]
    if missing:
        raise CheckpointError(f"{show(file)}: missing tensor {show(missing[0], 120)} (and {len(missing) - 1} more): "
                              "the model would keep it randomly initialised; the folder is incomplete or damaged")
    model.load_state_dict(state, strict=False)


def tied_groups(model: nn.Module) -> list[list[str]]:
    """The model's state-dict keys grouped by the tensor they hold: a tied group (one storage
    under several names, e.g. input embeddings and the LM head) has several keys, any other
    tensor is a group of one."""
    groups: dict[tuple, list[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        same = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype) if tensor.numel() > 0 else (key,)
        groups.setdefault(same, []).append(key)
    return list(groups.values())
