"""``upop.compress``: the whole job in one call (what ``upop compress`` runs)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from upop.checkpoint.folder import load_compressed
from upop.config import ResolvedSettings, UPopConfig, check_tracker, decide_workers
from upop.measure.cost import count_flops, count_params
from upop.errors import CheckpointError, ConfigError, UPopError, show
from upop.measure.latency import paired_latency, tf32_as, timed_on_main
from upop.checkpoint.card import write_model_card
from upop.runs.budget import budget_check
from upop.runs.report import build_report, describe_setup, retime_command, write_report
from upop.engine.resume import check_same_run, fingerprint
from upop.pruning.masks import refuse_pruned
from upop.runs.rundir import OWN_FILES, RUN_FILES, RunDir, check_out_dir, sees_marker, shared_marker, write_dir_atomic, write_json_atomic
from upop.tasks import Task, get_task
from upop.tasks._shard import evaluation_workers
from upop.engine.runtime import (PhaseClock, logger, check_shards, device_record, disk_full_guard, eval_autocast,
                                 process_group_kwargs, steps_per_epoch)
from upop.engine.run import Run, run_length

@dataclass
class CompressResult:
    """What :func:`compress` returns: the compressed model, its plan and the report."""

    model: nn.Module
    plan: Any
    report: dict[str, Any]
    out_dir: Path


def _model_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def measure(model: nn.Module, task: Task, processor, dataset) -> dict:
    """Parameters and FLOPs per sample (one real sample of ``dataset``)."""
    inputs = task.example_inputs(model, processor, dataset, 1)
    return {"params": count_params(model), "flops": count_flops(model, inputs)}


@contextlib.contextmanager
def _quiet_transformers():
    """No transformers progress bars ("Writing model shards", "Loading weights") for the run's own
    save and reload of the dense model; the previous setting is restored."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


DENSE_DIR = "dense-model"
"""Under ``out/state``: the dense model, saved at the start of a run for the paired latency
measurement at its end (on disk, not a second copy in memory); removed when the run finishes."""


def _shared(fn: Callable[[], Any], dist) -> Any:
    """Run ``fn`` on the main process only; an error there is raised on every process (the
    others mark it ``shared`` so only the main process prints it)."""
    error = None
    result = None
    if dist.is_main_process:
        try:
            result = fn()
        except UPopError as exc:
            error = exc
    if dist.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [None if error is None else (type(error), str(error))]
        broadcast_object_list(box)
        if box[0] is not None and error is None:
            cls, message = box[0]
            error = cls(message)
            error.shared = True
    if error is not None:
        raise error
    return result


def _check_shared_folder(out: Path, dist) -> None:
    """Multi-node runs need ``out`` on a disk every process sees (the main process writes the
    state and the checkpoint, every process reads them): refuse a node-local folder at once."""
    if dist.num_processes == 1:
        return
    import secrets
    import socket

    from accelerate.utils import broadcast_object_list, gather_object

    token = [secrets.token_hex(6) if dist.is_main_process else None]
    broadcast_object_list(token)
    with shared_marker(out, token[0]) if dist.is_main_process else contextlib.nullcontext():
        dist.wait_for_everyone()
        seen = gather_object([(sees_marker(out, token[0]), socket.gethostname())])
        dist.wait_for_everyone()
    blind = [(rank, host) for rank, (ok, host) in enumerate(seen) if not ok]
    if blind:
        rank, host = blind[0]
        error = ConfigError(f"output folder {out} is not shared: process {rank} on host {host} cannot see the files "
                            "process 0 writes there; multi-node runs need --out on a file system every node mounts")
        error.shared = not dist.is_main_process
        raise error


@contextlib.contextmanager
def _phase(name: str, model: nn.Module, run: Run, config: UPopConfig, dist):
    """Log where phase ``name`` runs and how long it took (for make gpu-check, the report and the
    tracker: ``run.record``)."""
    run.record(device_record(name, model, config.eval_precision))
    clock = PhaseClock(name, dist.device)
    # the evaluations load their batches in the run's DataLoader workers, as retraining's validation does
    with eval_autocast(dist.device, config.eval_precision), evaluation_workers(run.config.workers):
        yield clock
    run.record(clock.record())


def _dense_baseline(model, task, processor, test, config, out: Path, dist, run: Run) -> dict:
    """Dense metrics, params and FLOPs on the run's device (measured once; kept in ``dense.json``
    for resume); the main process also saves the dense model under ``state/dense-model`` for the
    paired latency at the end."""
    dense_file = out / "dense.json"
    if dist.is_main_process and not (out / "state" / DENSE_DIR / "config.json").is_file():
        with _quiet_transformers():
            write_dir_atomic(out / "state" / DENSE_DIR, model.save_pretrained)
    if dense_file.is_file():
        try:
            dense = json.loads(dense_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            dense = None
        if not isinstance(dense, dict) or not isinstance(dense.get("metrics"), dict):
            error = CheckpointError(f"{show(dense_file)}: damaged (not the dense model's metrics); start again "
                                    "with --overwrite")
            error.located = True
            raise error
        return dense
    run.log(f"evaluating the dense model on {len(test)} test samples")
    with _phase("dense_eval", model, run, config, dist):
        dense = {**measure(model, task, processor, test),
                 "metrics": task.evaluate(model, test, processor, config.eval_batch_size, accelerator=dist)}
    if dist.is_main_process:
        write_json_atomic(dense_file, dense)
    dist.wait_for_everyone()
    return dense


def _start_run(rundir: RunDir, *, resume: bool, overwrite: bool, restart_if_missing: bool, info: dict,
               min_free: int) -> bool:
    """Main process: take the folder for this run (lock, overwrite rules, resume checks, temp
    files of killed writes removed). Returns True if this is a fresh start."""
    out = rundir.path
    rundir.create()
    rundir.acquire()
    rundir.check_overwrite(resume, overwrite)
    rundir.clean_temp()
    rundir.note_existing()  # a rejected fresh run removes only what it wrote itself
    run_file = out / "run.json"
    if resume:
        if run_file.is_file():
            try:
                saved = json.loads(run_file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                raise CheckpointError(f"{run_file}: damaged (not JSON); start again with --overwrite") from None
            check_same_run(saved.get("fingerprint") if isinstance(saved, dict) else None, info["fingerprint"], out)
            return False
        if not restart_if_missing:
            raise ConfigError(f"--resume: {show(out)} holds no run to resume (no run.json); drop --resume to start "
                              "a new run there, or pass --restart-if-missing")
        rundir.check_empty("--restart-if-missing starts a new run only in an empty folder")
        rundir.check_free(min_free)
    else:
        rundir.check_free(min_free)
        if overwrite:
            rundir.set_aside_previous()
    write_json_atomic(run_file, info)
    return True


def compress(
    model: nn.Module,
    task: str | Task = "retrieval",
    data: str | os.PathLike | None = None,
    *,
    train=None,
    val=None,
    test=None,
    columns: dict[str, str] | None = None,
    processor=None,
    config: UPopConfig | None = None,
    out_dir: str | os.PathLike = "upop-out",
    resume: bool = False,
    overwrite: bool = False,
    restart_if_missing: bool = False,
    check_images: str = "header",
    base_model: str = "",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    stop_after: int | None = None,
) -> CompressResult:
    """Compress ``model`` with UPop on ``task`` and write the checkpoint and report to ``out_dir``.

    Give ``data`` (a folder in the task's format; checked first, see ``upop data check``, with
    ``check_images`` "header", "full" or "none") or the ``train``/``val``/``test`` datasets: a
    ``datasets.Dataset``, a torch ``Dataset`` or a list of dicts, rows as docs/data.md lists per task
    (Trainer-style ``pixel_values``/``labels``/``input_ids`` too); ``columns={"field": "their name"}``
    names a field the rows call otherwise.
    ``processor`` turns images and text into model inputs (saved with the checkpoint).
    Everything that can be checked is checked before ``out_dir`` is touched; an existing run there
    is only replaced with ``overwrite`` and kept in ``out_dir/.upop-previous`` until the new run
    finished. ``resume`` continues the run in ``out_dir`` if model, data and settings are the same.
    Returns the compressed model (loaded back from ``out_dir/compressed``), its plan and the report.

    Messages go to the standard ``logging`` logger ``"upop"`` (silent unless the application
    configures logging; ``upop compress`` prints them) and to ``log`` if given; with ``progress``
    False a progress line goes there every ``config.progress_every`` seconds instead of bars. The
    numbers of ``out_dir/log.jsonl`` also go to the tracker of ``config.report_to``, under
    ``out_dir/tracking``.
    """
    config = config or UPopConfig()
    config.validate()
    check_tracker(config.report_to)
    task = get_task(task).configure(config)
    task.check_model(model)
    refuse_pruned(model)
    out = check_out_dir(out_dir, {"model": base_model or str(getattr(model.config, "_name_or_path", "") or ""),
                                  "data": data})
    if processor is None:
        raise ConfigError("processor is required (the model's image processor and tokenizer)")
    if check_images not in ("header", "full", "none"):
        raise ConfigError(f"check_images={check_images!r} is not allowed; choose header, full or none")
    if data is not None:
        if check_images != "none":
            _check_data(task.name, data, check_images)
        splits = task.load_splits(data)
        train, val, test = splits["train"], splits["val"], splits["test"]
    if train is None or val is None:
        raise ConfigError("give data=FOLDER or train= and val= datasets")
    from upop.data.user_rows import adapt_splits

    splits, processor = adapt_splits(task, {"train": train, "val": val, "test": test}, processor, columns)
    train, val, test = splits["train"], splits["val"], splits["test"]
    test = test if test is not None else val
    for dataset in (train, val, test):
        task.check_data(model, dataset)
    from accelerate import PartialState

    dist = PartialState(cpu=not torch.cuda.is_available(), **process_group_kwargs())
    base_model = base_model or str(getattr(model.config, "_name_or_path", "") or "")
    # the settings are resolved once, here, and passed down (the run, run.json, the report, resume)
    processes = dist.num_processes
    check_shards(len(train), config.batch_size, processes)
    spe = steps_per_epoch(len(train), config.batch_size, processes)
    settings = config.resolve(task, device_type=dist.device.type, processes=processes,
                              search_steps=config.search_epochs * spe,
                              length=run_length(config, len(train), spe, processes))
    fp = fingerprint(task=task.name, settings=settings, model=model,
                     datasets={"train": train, "val": val, "test": test}, processes=processes)
    # the run's length and settings are checked before the output folder is touched
    run = Run(model, task, train, val, settings, processor, out, resume=resume, base_model=base_model,
              log=log, progress=progress, stop_after=stop_after, fingerprint=fp)
    info = {"task": task.name, "base_model": base_model, "data": str(data or ""), "config": config.to_dict(),
            "settings": run.settings.to_dict(), "fingerprint": fp}
    rundir = RunDir(out)
    fresh = None
    try:
        fresh = _shared(lambda: _start_run(rundir, resume=resume, overwrite=overwrite,
                                           restart_if_missing=restart_if_missing, info=info,
                                           min_free=4 * _model_bytes(model) + 50 * 2**20), dist)
        _check_shared_folder(out, dist)
        model.to(dist.device)
        run.resume = resume and not fresh
        run.signals.where = f"during the dense evaluation; the run is saved in {out}"
        with run.signals:  # a stop here is a stopped run (resumable), not a killed process
            dense = _dense_baseline(model, task, processor, test, config, out, dist, run)
    except BaseException as exc:
        run.tracking.close()
        if dist.is_main_process:
            if fresh and not _interrupted(exc):  # a rejected fresh run: what it wrote goes, the previous run
                _abandon(rundir)                 # comes back
            rundir.release()
            rundir.discard_created()
        raise
    try:
        result = run.run()
        compressed, report = _finish(run, result, task, processor, test, config, rundir, dense, dist)
    except UPopError as exc:
        if not any(("--resume" in str(exc), "--overwrite" in str(exc), getattr(exc, "shared", False),
                    getattr(exc, "located", False))):
            exc = type(exc)(f"{exc}; the run is saved in {out}: once fixed, run the same command with --resume")
            raise exc from None
        raise
    finally:
        run.tracking.close()
        if dist.is_main_process:
            rundir.release()
    return CompressResult(model=compressed, plan=result.plan, report=report, out_dir=out)


def _interrupted(exc: BaseException) -> bool:
    """A run that was taken and then stopped (a signal, Ctrl-C) or ran out of disk is kept: its
    folder resumes with ``--resume``. Any other failure before the search rejects the fresh run."""
    from upop.engine.runtime import DiskFullError, is_disk_full

    return isinstance(exc, (KeyboardInterrupt, DiskFullError)) or is_disk_full(exc)


def _abandon(rundir: RunDir) -> None:
    """Remove what a rejected fresh run wrote (only names a run writes, and none that was in the
    folder when the run took it) and bring back the previous run that ``--overwrite`` set aside."""
    for name in sorted(RUN_FILES - OWN_FILES - rundir.existing):
        path = rundir.path / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink(missing_ok=True)
    rundir.restore_previous()


def _finish(run: Run, result, task: Task, processor, test, config: UPopConfig, rundir: RunDir, dense: dict,
            dist) -> tuple[nn.Module, dict]:
    """Evaluate and time the compressed model on the run's device; write the report; the
    previous run set aside by ``--overwrite`` goes only now.

    A stop (SIGTERM, Ctrl-C) here ends the run at once, as in the other phases: one message, the
    lock released (by :func:`compress`); the state already says "done", so ``--resume`` redoes
    only this phase. The report and the clean-up after it are written whole (a signal then is
    only recorded: the run is complete)."""
    out = rundir.path
    signals = run.signals
    signals.where = f"during the final evaluation; the run is saved in {out}"
    with signals:
        compressed = load_compressed(out / "compressed", device=dist.device)
        run.log(f"evaluating the compressed model on {len(test)} test samples")
        with _phase("final_eval", compressed, run, config, dist):
            comp = {**measure(compressed, task, processor, test),
                    "metrics": task.evaluate(compressed, test, processor, config.eval_batch_size, accelerator=dist)}
        batch = run.config.latency_batch_size  # decided: auto is 32 on a GPU, 1 on the CPU

        def paired() -> dict:  # the main process times, the others wait (timed_on_main)
            inputs = task.example_inputs(compressed, processor, test, batch)
            with _quiet_transformers():
                dense_model = type(compressed).from_pretrained(str(out / "state" / DENSE_DIR),
                                                               trust_remote_code=False,
                                                               use_safetensors=True).to(dist.device).eval()
            return paired_latency(dense_model, compressed, inputs, seconds=config.latency_time, batch=batch)

        with _phase("latency", compressed, run, config, dist):
            latency = timed_on_main(paired, dist)  # returns after the main process read state/dense-model
        dense["latency_ms"], comp["latency_ms"] = latency["dense_ms"], latency["compressed_ms"]
        p = next(compressed.parameters())
        try:  # the data folder as the run was given it, for the re-time command
            data = json.loads((out / "run.json").read_text()).get("data") or "DATA"
        except (OSError, ValueError, AttributeError):
            data = "DATA"
        latency["retime_command"] = retime_command(
            model=out / "compressed", baseline=result.plan.base_model or "DENSE_MODEL", task=task.name, data=data,
            batch=batch, seconds=config.latency_time, precision=config.eval_precision,
            tf32=config.tf32)
        report = build_report(
            task=task.name, plan=result.plan, dense=dense, compressed=comp, target_ratio=config.ratio,
            cost=config.cost, settings=config.to_dict(), resolved=run.settings.to_dict(), latency=latency,
            latency_input=f"FLOPs: one test sample; latency: {describe_setup(latency)}",
        )
        report["round_to"] = run.settings.decisions()["round_to"]
        report["score"] = config.score
        report["distill"] = {"mode": "task", "teacher_cached": bool(task.teacher_cached)} \
            if task.needs_teacher else run.distill_info
        report["validation"] = {"best": result.best_metrics, "history": result.history}
        report["device"] = str(p.device)
        report["memory"] = run.memory  # the training memory the run needs at least, and what its GPU had
        report["processes"] = dist.num_processes
        budget = budget_check(task=task.name, metric=task.main_metric, bar=task.quality_bar,
                              value=comp["metrics"].get(task.main_metric), history=result.history,
                              retrain_steps=run.retrain_steps, retrain_epochs=config.retrain_epochs)
        if budget is not None:  # the task's quality bar missed: said, with the steps it would need
            report["budget"] = budget
            if dist.is_main_process:
                logger.warning(budget["message"])
        with signals.deferred():
            if dist.is_main_process:
                with disk_full_guard(out, out / "state", what=f"the report in {show(out)}"):
                    write_report(report, out)
                    write_model_card(out / "compressed", result.plan, report)  # README.md with the run's table
                shutil.rmtree(out / "state" / DENSE_DIR, ignore_errors=True)
                rundir.drop_previous()
            dist.wait_for_everyone()
    return compressed, report


def _check_data(task: str, data, images: str) -> None:
    """The data set's check (``upop data check``): any problem refuses the run up front."""
    from upop.data.check import check_data

    check_data(task, data, images=images).raise_for_problems()


class Metrics(dict):
    """What :func:`evaluate` returns: metric name -> value (a plain dict for JSON and comparisons),
    and ``setup``, how they were computed: ``eval_precision``, ``tf32`` and ``from`` (where those two
    came from: ``"run"``, ``"argument"`` or ``"config"``)."""

    setup: dict[str, Any]


def evaluation_setup(settings: ResolvedSettings | None, config: UPopConfig, precision: str | None = None,
                     tf32: bool | None = None) -> dict[str, Any]:
    """The evaluation precision and TF32 of :func:`evaluate`: each as passed (``precision``,
    ``tf32``), else the run's (``settings``: a run's compressed folder replays how the run evaluated,
    so its metrics are the report's), else ``config``'s."""
    source = "argument" if precision is not None or tf32 is not None else "run" if settings is not None else "config"
    recorded = settings.config() if settings is not None else config
    precision = recorded.eval_precision if precision is None else precision
    tf32 = recorded.tf32 if tf32 is None else tf32
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision={show(precision)} is not allowed; choose fp32 or bf16")
    if not isinstance(tf32, bool):
        raise ConfigError(f"tf32={show(tf32)} is not allowed; tf32 must be true or false")
    return {"eval_precision": precision, "tf32": tf32, "from": source}


def evaluate(model_or_path, task: str | Task, data, split: str = "test", processor=None, batch_size: int = 64,
             config: UPopConfig | None = None, teacher=None, *, precision: str | None = None,
             tf32: bool | None = None) -> Metrics:
    """Metrics of a model (or a compressed/dense checkpoint folder) on a split of ``data``; the task
    settings of ``config`` (e.g. ``vqa_inference``) apply; without ``config``, those the run used
    when the folder is a run's ``OUT/compressed`` (its resolved settings in ``OUT/run.json``), else the
    defaults. ``teacher`` (a model or folder: the dense model) is what the label-free task
    ``distill`` measures agreement with.

    The evaluation runs at ``precision`` (fp32, or bf16 autocast) with TF32 on CUDA as ``tf32`` says;
    left unset, a run's folder replays the run's ``eval_precision`` and ``tf32`` (also when ``config``
    is given: the command line passes its task settings there), other models use ``config``'s. The
    returned :class:`Metrics` says which in ``setup`` (:func:`evaluation_setup`)."""
    from upop.models.folders import load_any

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} is not allowed; need an integer >= 1")
    settings = run_settings(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else None
    if config is None:
        config = settings.config() if settings is not None else UPopConfig()
    config.validate()
    setup = evaluation_setup(settings, config, precision, tf32)
    task = get_task(task).configure(config)
    if isinstance(model_or_path, (str, os.PathLike)):
        model, loaded_processor = load_any(model_or_path)
        processor = processor or loaded_processor
        if torch.cuda.is_available():  # the same device a run evaluates on
            model.to("cuda")
    else:
        model = model_or_path
    task.check_model(model)
    if task.needs_teacher:
        if teacher is None:
            raise ConfigError(f"task {task.name!r} measures agreement with the dense model: give it as teacher "
                              "(upop evaluate --teacher DENSE_MODEL_DIR)")
        from upop.distill.distiller import make_teacher

        if isinstance(teacher, (str, os.PathLike)):
            teacher = load_any(teacher)[0]
        task.set_teacher(make_teacher(teacher, device=next(model.parameters()).device))
    elif teacher is not None:
        raise ConfigError(f"teacher is used by the label-free task distill only, not by {task.name!r}")
    dataset = task.load_splits(data, splits=(split,))[split]
    device = next(model.parameters()).device
    workers = decide_workers(config.workers, device.type, 1)[0]  # as a run would load the batches here
    with eval_autocast(device, setup["eval_precision"]), tf32_as(device, setup["tf32"]), evaluation_workers(workers):
        metrics = Metrics(task.evaluate(model, dataset, processor, batch_size))
    metrics.setup = setup
    return metrics


def run_settings(compressed_dir: str | os.PathLike) -> ResolvedSettings | None:
    """The resolved settings of the run whose ``compressed`` folder ``compressed_dir`` is (from the
    ``run.json`` beside it), or None where it is no run's folder or the run predates resolved
    settings; settings of another version are one :class:`ConfigError` line."""
    folder = Path(compressed_dir)
    run_file = folder.parent / "run.json"
    if folder.name != "compressed" or not run_file.is_file():
        return None
    try:
        saved = json.loads(run_file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(saved, dict) or "settings" not in saved:
        return None
    return ResolvedSettings.from_dict(saved["settings"], source=show(run_file))
