"""Compressed checkpoints: a Hugging Face-style folder plus the pruning plan.

    out/config.json          the dense model's config, unchanged
    out/upop_plan.json       versioned, sorted JSON: kept units per group, provenance, ratios
    out/model.safetensors    the compressed weights (no pickle: loading never executes code)
    out/<tokenizer / processor files>

The folder is written into a temporary sibling and renamed into place, so a killed save never
leaves a half-written checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model
from torch import nn

from ._safe_load import check_dtypes, check_folder, read_config, read_json, reason, scan_safetensors
from .arch import ArchSpec, get_spec, spec_by_name
from .errors import CheckpointError, UnsupportedModelError, show
from .prune import PruningPlan, apply_plan
from .rundir import write_dir_atomic

PLAN_FILE = "upop_plan.json"
WEIGHTS_FILE = "model.safetensors"
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
)


def save_compressed(model: nn.Module, out_dir: str | os.PathLike, processor=None, plan: PruningPlan | None = None) -> Path:
    """Write ``model`` (pruned by :func:`upop.prune`) as a compressed checkpoint folder.

    ``processor`` (a tokenizer, image processor or processor) is saved alongside; if omitted and
    the plan's base model is a local folder, its tokenizer/processor files are copied.
    """
    plan = plan or getattr(model, "upop_plan", None)
    if plan is None:
        raise CheckpointError("this model has no pruning plan: call upop.prune(model, masks) before save_compressed")
    def fill(tmp: Path) -> None:
        model.config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None and getattr(model, "can_generate", lambda: False)():
            gen.save_pretrained(tmp)
        (tmp / PLAN_FILE).write_text(plan.to_json())
        save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "upop_format": str(plan.format_version)})
        if processor is not None:
            processor.save_pretrained(tmp)
        elif plan.base_model and Path(plan.base_model).is_dir():
            for name in _PROCESSOR_FILES:
                src = Path(plan.base_model) / name
                if src.is_file():
                    shutil.copy2(src, tmp / name)

    return write_dir_atomic(out_dir, fill)


def read_plan(path: str | os.PathLike) -> PruningPlan:
    """The :class:`PruningPlan` of a compressed checkpoint folder (size-, depth- and type-checked)."""
    file = Path(path) / PLAN_FILE
    if not file.is_file():
        raise CheckpointError(f"{show(path)}: no {PLAN_FILE}; is this a upop compressed checkpoint?")
    return PruningPlan.from_dict(read_json(file), source=str(file))


def model_class(name: str):
    """Resolve a model class name to a class, only among classes an arch spec declares."""
    from .arch import _REGISTRY

    known = {c for spec in _REGISTRY.values() for c in spec.classes}
    if name not in known:
        raise CheckpointError(f"model class {show(name, 80)} is not one upop knows; known: {', '.join(sorted(known))}")
    cls = getattr(transformers, name, None)
    if cls is None:
        from . import models  # project-defined classes (e.g. task models) register here

        cls = models.project_class(name)
    return cls


def load_compressed(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    spec: ArchSpec | None = None) -> nn.Module:
    """Load a compressed checkpoint folder: same class as the dense model, in eval mode.

    Everything is checked before a model is built: the plan, that nothing in the folder asks for
    its own code (upop never runs it), that the plan's class and model type are the ones
    ``config.json`` records, and every stored tensor (readable, finite). The model is then built
    from ``config.json`` (no weights), shaped by the plan with the same slicing code as
    :func:`upop.prune`, and the weights are loaded strictly (names, shapes and dtype kinds). A
    model pruned with a spec of your own needs that spec: pass it as ``spec`` (or
    ``register_spec`` it first).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{show(path)}: not a directory")
    plan = read_plan(path)
    _check_config_matches_plan(check_folder(path), plan, path)
    cls = model_class(plan.model_class)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{show(path)}: no {WEIGHTS_FILE}")
    found = scan_safetensors([weights])
    model = _build(cls, read_config(path, cls), path)
    apply_plan(model, plan, spec=_plan_spec(plan, spec, model, path))
    check_dtypes(found, model.state_dict())
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:  # changed since it was scanned
        raise CheckpointError(f"{show(weights)}: cannot be read ({reason(exc)})") from None
    _load_strict(model, state, weights)
    if dtype is not None:
        model.to(dtype)
    return model.to(device).eval()


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
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise CheckpointError(f"{show(file)}: unexpected tensor {show(unexpected[0], 120)} (and "
                              f"{len(unexpected) - 1} more) for this plan")
    for key, tensor in state.items():
        if tuple(own[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{show(file)}: tensor {show(key, 120)} has shape {tuple(tensor.shape)} but the "
                                  f"plan gives {tuple(own[key].shape)}")
    result = model.load_state_dict(state, strict=False)
    # Tied weights are stored once; a missing key that aliases a stored tensor is fine.
    tied = set(_tied_keys(model))
    really_missing = [k for k in result.missing_keys if k not in tied]
    if really_missing:
        raise CheckpointError(f"{show(file)}: missing tensor {really_missing[0]} (and {len(really_missing) - 1} more)")


def _tied_keys(model: nn.Module) -> list[str]:
    """State-dict keys that share storage with another key (stored once by safetensors)."""
    seen: dict[int, str] = {}
    tied = []
    for key, tensor in model.state_dict(keep_vars=True).items():
        ptr = tensor.data_ptr()
        if ptr in seen and tensor.numel() > 0:
            tied.append(key)
            tied.append(seen[ptr])
        else:
            seen[ptr] = key
    return tied
