"""Compressed checkpoints: a Hugging Face-style folder plus the pruning plan.

    out/config.json          the dense model's config, unchanged
    out/upop_plan.json       versioned, sorted JSON: kept units per group, provenance, ratios
    out/model.safetensors    the compressed weights (no pickle: loading never executes code)
    out/<tokenizer / processor files>

The folder is written into a temporary sibling and renamed into place, so a killed save never
leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model
from torch import nn

from .arch import ArchSpec, get_spec, spec_by_name
from .errors import CheckpointError, UnsupportedModelError
from .prune import PruningPlan, apply_plan

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


def write_dir_atomic(out_dir: str | os.PathLike, fill: Callable[[Path], Any]) -> Path:
    """Write a folder atomically: ``fill(tmp)`` writes into a temporary sibling folder, which then
    replaces ``out_dir``; a failure or kill leaves the previous ``out_dir`` (or none) intact."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        fill(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def read_plan(path: str | os.PathLike) -> PruningPlan:
    """The :class:`PruningPlan` of a compressed checkpoint folder."""
    file = Path(path) / PLAN_FILE
    if not file.is_file():
        raise CheckpointError(f"{path}: no {PLAN_FILE}; is this a upop compressed checkpoint?")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from None
    return PruningPlan.from_dict(data, source=str(file))


def model_class(name: str):
    """Resolve a model class name to a class, only among classes an arch spec declares."""
    from .arch import _REGISTRY

    known = {c for spec in _REGISTRY.values() for c in spec.classes}
    if name not in known:
        raise CheckpointError(f"model class {name!r} is not one upop knows; known: {', '.join(sorted(known))}")
    cls = getattr(transformers, name, None)
    if cls is None:
        from . import models  # project-defined classes (e.g. task models) register here

        cls = models.project_class(name)
    return cls


def load_compressed(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    spec: ArchSpec | None = None) -> nn.Module:
    """Load a compressed checkpoint folder: same class as the dense model, in eval mode.

    The model is built from ``config.json`` (no weights), shaped by the plan with the same
    slicing code as :func:`upop.prune`, then the weights are loaded strictly. A model pruned with
    a spec of your own needs that spec: pass it as ``spec`` (or ``register_spec`` it first).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    plan = read_plan(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json")
    if not (path / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{path}: no {WEIGHTS_FILE}")
    try:
        config = transformers.AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / 'config.json'}: cannot be read ({str(exc).splitlines()[0]})") from None
    if config.model_type != plan.model_type:
        raise CheckpointError(
            f"{path}: config model_type {config.model_type!r} does not match the plan's {plan.model_type!r}"
        )
    cls = model_class(plan.model_class)
    model = cls(config)
    if spec is not None and plan.spec and spec.name != plan.spec:
        raise CheckpointError(f"{path}: the plan was made with spec {plan.spec!r}, not the given {spec.name!r}")
    if spec is None:
        try:
            spec = spec_by_name(plan.spec) if plan.spec else get_spec(model)
        except UnsupportedModelError as exc:
            raise CheckpointError(f"{path}: {exc}; a model pruned with your own spec loads with "
                                  "load_compressed(path, spec=your_spec) or after register_spec(your_spec)") from None
    apply_plan(model, plan, spec=spec)
    try:
        state = load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path / WEIGHTS_FILE}: cannot be read ({exc})") from None
    _load_strict(model, state, path / WEIGHTS_FILE)
    if dtype is not None:
        model.to(dtype)
    return model.to(device).eval()


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], file: Path) -> None:
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise CheckpointError(f"{file}: unexpected tensor {unexpected[0]} (and {len(unexpected) - 1} more) for this plan")
    for key, tensor in state.items():
        if tuple(own[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{file}: tensor {key} has shape {tuple(tensor.shape)} but the plan gives {tuple(own[key].shape)}"
            )
    result = model.load_state_dict(state, strict=False)
    # Tied weights are stored once; a missing key that aliases a stored tensor is fine.
    tied = set(_tied_keys(model))
    really_missing = [k for k in result.missing_keys if k not in tied]
    if really_missing:
        raise CheckpointError(f"{file}: missing tensor {really_missing[0]} (and {len(really_missing) - 1} more)")


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
