"""Resume that checks what it resumes.

A run's result is a function of the dense weights, the data, the settings that change the
computation and the number of processes (the global batch). :func:`fingerprint` condenses them
into short digests, stored in ``run.json`` at the start of a run and in every saved state;
``--resume`` recomputes it and refuses, in one line naming the fields that differ, when anything
changed. :func:`read_state` loads ``state/run.pt`` (``weights_only``: tensors and plain data,
never code) and checks it is a state this run could have written.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from upop.errors import CheckpointError, ConfigError

#: settings that do not change what a run computes (so they may differ on resume)
FREE_SETTINGS = frozenset({"workers", "checkpoint_every", "latency_time", "latency_batch_size"})

#: settings that change nothing while distillation is off (``distill="none"``): a run is the same
#: run whatever they are then (so a run started before a default of theirs changed still resumes)
DISTILL_ONLY = frozenset({"distill_weight", "distill_temperature", "teacher_precision", "distill_cache"})

PHASES = ("search", "retrain", "done")


def _effective(settings: dict, task: str | None) -> dict:
    """``settings`` without the ones that do not act in this run (:data:`DISTILL_ONLY` without
    distillation; task ``distill`` uses ``distill_cache``), ``distill="auto"`` as the mode it
    stands for in this task (:func:`upop.distill.distiller.resolve`)."""
    from upop.distill.distiller import resolve

    # a run from before the field existed counts as "auto"; what a ranking does mid-search is checked by
    # the search state's settings
    settings = {**settings, "ranking": settings.get("ranking", "auto")}
    setting = settings.get("distill", "none")
    if setting == "auto":  # compared as what it stands for: a run of "none" before the default changed is the same run
        settings = {**settings, "distill": resolve(setting, task, settings.get("distill_cache", True))}
    if settings.get("distill", "none") != "none":
        return settings
    inert = DISTILL_ONLY - {"distill_cache"} if task == "distill" else DISTILL_ONLY
    return {k: v for k, v in settings.items() if k not in inert}


def _digest(h: "hashlib._Hash") -> str:
    return h.hexdigest()[:16]


def model_digest(model: nn.Module) -> str:
    """Digest of the model's class, tensor names, shapes, dtypes and bytes (a few seconds for
    a 400M-parameter model: it reads every weight once)."""
    h = hashlib.blake2b(type(model).__name__.encode(), digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return _digest(h)


def _items_of(dataset) -> Any:
    for attr in ("items", "pairs"):
        if hasattr(dataset, attr):
            return getattr(dataset, attr)
    return [len(dataset)]


def data_digest(datasets: dict[str, Any]) -> str:
    """Digest of the annotations of every split: each item's file names, captions, questions,
    answers and labels as the reader parsed them (not the image bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for split in sorted(datasets):
        if datasets[split] is None:
            continue
        h.update(f"[{split}]".encode())
        h.update(repr(_items_of(datasets[split])).encode())
        h.update(repr(getattr(datasets[split], "classes", None)).encode())
    return _digest(h)


def fingerprint(*, task: str, settings: dict, model: nn.Module, datasets: dict[str, Any], processes: int) -> dict:
    """What defines this run's result, as short comparable values."""
    return {
        "task": task,
        "processes": int(processes),
        "settings": {k: v for k, v in sorted(_effective(settings, task).items()) if k not in FREE_SETTINGS},
        "model": model_digest(model),
        "data": data_digest(datasets),
    }


def differences(saved: dict, current: dict) -> list[str]:
    """Names of the fields that differ, e.g. ``["ratio (0.5 -> 0.8)", "data", "model"]``."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if key == "settings" and isinstance(a, dict) and isinstance(b, dict):
            a, b = _effective(a, saved.get("task")), _effective(b, current.get("task"))
            for name in sorted(set(a) | set(b)):
                if a.get(name) != b.get(name):
                    out.append(f"{name} ({a.get(name)!r} -> {b.get(name)!r})")
        elif a != b:
            out.append(f"{key} ({a!r} -> {b!r})" if key in ("task", "processes") else
                       {"model": "model weights", "data": "data annotations"}.get(key, key))
    return out


def check_same_run(saved: dict | None, current: dict, where: Path) -> None:
    """Refuse to resume a run whose fingerprint differs from this invocation's."""
    if not isinstance(saved, dict):
        raise ConfigError(f"{where}: the run has no fingerprint (written by an older upop or damaged); "
                          "start it again with --overwrite")
    diff = differences(saved, current)
    if diff:
        shown = ", ".join(diff[:6]) + (f" and {len(diff) - 6} more" if len(diff) > 6 else "")
        hint = ""
        if any(d.startswith("distill ('none' -> ") for d in diff) and current.get("settings", {}).get("distill") == "auto":
            hint = " (--distill auto, the default since this run started, distils here: pass --distill none to resume it)"
        raise ConfigError(f"--resume: this command differs from the run in {where}: {shown}{hint}; "
                          "use the same model, data and settings, or --overwrite to start again")


def read_state(file: Path, fingerprint: dict, totals: dict[str, int]) -> dict | None:
    """The run state in ``file``, checked, or None if there is none.

    A pickle (code) is refused by ``weights_only``; a truncated or damaged file, missing keys, a
    phase that does not exist or a step beyond the run's length are each one clear error.
    """
    if not file.is_file():
        return None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "not plain tensors"
        raise CheckpointError(f"{file}: refused, it holds more than tensors and plain data ({first[:120]}); "
                              "upop never unpickles code: start again with --overwrite") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{file}: cannot be read ({first[:120]}); the file is damaged: "
                              "start again with --overwrite") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: not a upop run state (a {type(state).__name__})")
    missing = [k for k in ("phase", "step", "model", "rng") if k not in state]
    if missing:
        raise CheckpointError(f"{file}: not a complete run state (missing {', '.join(missing)}); "
                              "start again with --overwrite")
    phase, step = state["phase"], state["step"]
    if phase not in PHASES:
        raise CheckpointError(f"{file}: unknown phase {phase!r} (known: {', '.join(PHASES)})")
    limit = totals.get(phase, totals.get("retrain", 0)) if phase != "done" else totals["retrain"]
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= limit:
        raise CheckpointError(f"{file}: step {step!r} of phase {phase!r} is outside this run (0..{limit})")
    if "fingerprint" in state:
        check_same_run(state["fingerprint"], fingerprint, file.parent.parent)
    return state

