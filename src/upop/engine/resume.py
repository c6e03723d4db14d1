"""Resume that checks what it resumes.

A run's result is a function of the dense weights, the data, the settings that change the
computation and the number of processes (the global batch). :func:`fingerprint` condenses them
into short digests, stored in ``run.json`` at the start of a run and in every saved state;
``--resume`` recomputes it and refuses, in one line naming the fields that differ, when anything
changed. The settings part is versioned (:data:`upop.config.SETTINGS_VERSION`): a fingerprint of an
older version is brought to this one by the steps of :data:`MIGRATIONS` before the comparison, one of
a newer version is refused. :func:`read_state` loads ``state/run.pt`` (``weights_only``: tensors and
plain data, never code) and checks it is a state this run could have written.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from upop.config import DECIDED, SETTINGS_VERSION, ResolvedSettings, decide_distill
from upop.errors import CheckpointError, ConfigError, show

#: settings that do not change what a run computes (so they may differ on resume; a run that ran out
#: of memory resumes with ``gradient_checkpointing`` on: the gradients are the same)
FREE_SETTINGS = frozenset({"workers", "checkpoint_every", "latency_time", "latency_batch_size", "report_to",
                           "progress_every", "gradient_checkpointing"})

#: settings that change nothing while distillation is off (``distill="none"``): a run is the same
#: run whatever they are then (so a run started before a default of theirs changed still resumes)
DISTILL_ONLY = frozenset({"distill_weight", "distill_temperature", "teacher_precision", "distill_cache"})

#: what a fingerprint carries besides the compared fields: the settings' version and the names of the
#: settings the command left to upop (``auto`` / unset), which only word the refusal
NOT_COMPARED = frozenset({"settings_version", "auto"})

PHASES = ("search", "retrain", "done")

#: compared settings added after settings version 1 was written, with the value a run whose
#: fingerprint lacks them ran with (:func:`migrate` fills it in: such a run still resumes)
ADDED_SINCE = {"modalities": "all"}


def _compared(values: dict, task: str | None) -> dict:
    """The settings of ``values`` (decided ``distill``) that define the run: without
    :data:`FREE_SETTINGS`, and without :data:`DISTILL_ONLY` when nothing is distilled (task
    ``distill`` uses ``distill_cache`` for its own teacher table)."""
    inert = frozenset()
    if values["distill"] == "none":
        inert = DISTILL_ONLY - {"distill_cache"} if task == "distill" else DISTILL_ONLY
    inert = inert | _other_tasks_settings(task)
    return {k: v for k, v in sorted(values.items()) if k not in FREE_SETTINGS and k not in inert}


def _other_tasks_settings(task: str | None) -> frozenset:
    """The task settings (``task=True`` in :class:`~upop.config.UPopConfig`) that ``task`` does not
    read (:attr:`upop.tasks.base.Task.settings`): they change nothing in its run (so a run started
    before a default of theirs changed still resumes)."""
    from dataclasses import fields

    from upop.config import UPopConfig
    from upop.tasks import get_task, task_names

    if task is None or task not in task_names():
        return frozenset()
    own = set(getattr(get_task(task), "settings", ()))
    return frozenset(f.name for f in fields(UPopConfig) if f.metadata.get("task") and f.name not in own)


def compared_settings(settings: ResolvedSettings) -> dict:
    """The settings resume compares: as given, so a resumed command asks for what the run asked for,
    except ``distill``, compared as the mode it decided (``auto`` and that mode are the same run: a
    run of ``none`` resumes under ``auto`` where auto distils nothing). The other decisions follow
    from compared inputs (``lr``; ``cost`` and ``score``; the data, batch and processes) or do not
    change the result (``workers``); the search state checks the ranking it ran with."""
    return _compared({**settings.given, "distill": settings["distill"]}, settings.task)


# settings that runs without a settings version may lack, with the value such a run ran with
_ADDED_BEFORE_VERSIONS = {"distill": "none", "distill_cache": True, "ranking": "auto"}


def _from_version_0(fp: dict) -> dict:
    """A fingerprint of a run written before settings had a version: its settings as given (with
    ``distill`` already decided where it was written then, ``auto`` where it was written before
    that), missing the settings added since (:data:`_ADDED_BEFORE_VERSIONS`, filled with the value
    such a run ran with); ``auto`` is decided as it was then (the same rule,
    :func:`upop.config.decide_distill`) and the settings that do not act are dropped."""
    settings = {**_ADDED_BEFORE_VERSIONS, **fp["settings"]}
    auto = sorted(k for k in DECIDED if settings.get(k, "") in ("auto", None))
    settings["distill"] = decide_distill(settings["distill"], fp.get("task"), settings["distill_cache"])[0]
    return {**fp, "settings_version": 1, "settings": _compared(settings, fp.get("task")), "auto": auto}


MIGRATIONS: dict[int, Callable[[dict], dict]] = {0: _from_version_0}
"""Version ``n`` -> the step that turns a fingerprint of settings version ``n`` into one of ``n + 1``."""


def settings_version(fp: dict, where: str | Path = "the run") -> int:
    """The settings version of fingerprint ``fp``: 0 where it has none (a run from before
    versions); one this upop does not know is refused in one line."""
    version = fp.get("settings_version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= SETTINGS_VERSION:
        raise ConfigError(f"{where}: the run's settings are version {show(version)}, which this upop does not know "
                          f"(it reads versions 0 to {SETTINGS_VERSION}); resume it with the upop that started it, "
                          "or start again with --overwrite")
    return version


def migrate(fp: dict, where: str | Path = "the run") -> dict:
    """Fingerprint ``fp`` at this upop's settings version (:data:`MIGRATIONS`, one version at a time)."""
    version = settings_version(fp, where)
    while version < SETTINGS_VERSION:
        fp = MIGRATIONS[version](fp)
        version = fp["settings_version"]
    if not isinstance(fp.get("settings"), dict):
        raise ConfigError(f"{where}: the run's fingerprint has no settings (damaged); start again with --overwrite")
    return {**fp, "settings": {**ADDED_SINCE, **fp["settings"]}}


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


def fingerprint(*, task: str, settings: ResolvedSettings, model: nn.Module, datasets: dict[str, Any],
                processes: int) -> dict:
    """What defines this run's result, as short comparable values (and the settings' version)."""
    return {
        "settings_version": settings.version,
        "task": task,
        "processes": int(processes),
        "settings": compared_settings(settings),
        "auto": sorted(name for name in DECIDED if settings.given[name] in ("auto", None)),
        "model": model_digest(model),
        "data": data_digest(datasets),
    }


def differences(saved: dict, current: dict) -> list[str]:
    """Names of the fields that differ, e.g. ``["ratio (0.5 -> 0.8)", "data", "model"]``; both
    fingerprints are first brought to this upop's settings version (:func:`migrate`)."""
    saved, current = migrate(saved), migrate(current)
    out = []
    for key in sorted((set(saved) | set(current)) - NOT_COMPARED):
        a, b = saved.get(key), current.get(key)
        if key == "settings":
            for name in sorted(set(a) | set(b)):
                if a.get(name) != b.get(name):
                    out.append(f"{name} ({a.get(name)!r} -> {b.get(name)!r})")
        elif a != b:
            out.append(f"{key} ({a!r} -> {b!r})" if key in ("task", "processes") else
                       {"model": "model weights", "data": "data annotations"}.get(key, key))
    return out


def check_same_run(saved: dict | None, current: dict, where: Path) -> None:
    """Refuse to resume a run whose fingerprint differs from this invocation's (or whose settings
    version this upop does not know)."""
    if not isinstance(saved, dict):
        raise ConfigError(f"{where}: the run has no fingerprint (written by an older upop or damaged); "
                          "start it again with --overwrite")
    migrate(saved, where)  # a version this upop does not know is named with the run's folder
    diff = differences(saved, current)
    if diff:
        shown = ", ".join(diff[:6]) + (f" and {len(diff) - 6} more" if len(diff) > 6 else "")
        hint = ""
        if any(d.startswith("distill ('none' -> ") for d in diff) and "distill" in migrate(current)["auto"]:
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

