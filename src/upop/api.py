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

from .checkpoint import load_compressed, write_dir_atomic
from .config import UPopConfig
from .cost import count_flops, count_params, measure_latency
from .errors import ConfigError
from .report import build_report, write_report
from .tasks import Task, get_task
from .train import Run, check_output_dir

# Files a upop run writes; only a folder holding nothing else may be overwritten.
RUN_FILES = {"report.json", "report.md", "allocation.png", "log.jsonl", "run.json", "state", "compressed", "dense.json"}


@dataclass
class CompressResult:
    """What :func:`compress` returns: the compressed model, its plan and the report."""

    model: nn.Module
    plan: Any
    report: dict[str, Any]
    out_dir: Path


def prepare_output(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a folder that holds another run unless resuming or overwriting it."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"output {out} exists and is not a folder")
    entries = {p.name for p in out.iterdir()}
    if not entries or resume:
        return
    if not overwrite:
        raise ConfigError(f"output folder {out} already holds files ({', '.join(sorted(entries)[:3])}); "
                          "pass --resume to continue that run or --overwrite to replace it")
    foreign = sorted(entries - RUN_FILES - {e for e in entries if e.startswith(".")})
    if foreign:
        raise ConfigError(f"output folder {out} holds files upop did not write ({', '.join(foreign[:3])}); "
                          "refusing to overwrite it, choose another --out")
    for name in entries:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _model_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def measure(model: nn.Module, task: Task, processor, dataset) -> dict:
    """Parameters and FLOPs per sample (one real sample of ``dataset``)."""
    inputs = task.example_inputs(model, processor, dataset, 1)
    return {"params": count_params(model), "flops": count_flops(model, inputs)}


def paired_latency(dense: nn.Module, compressed: nn.Module, inputs: dict, rounds: int = 3,
                   seconds: float = 0.5) -> tuple[float, float]:
    """Latency of both models, interleaved over ``rounds`` and the best median kept for each,
    so machine noise hits both alike."""
    d, c = [], []
    for _ in range(rounds):
        d.append(measure_latency(dense, inputs, min_run_time=seconds))
        c.append(measure_latency(compressed, inputs, min_run_time=seconds))
    return min(d), min(c)


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


def _dense_baseline(model, task, processor, test, config, out: Path, resume: bool, base_model: str, data,
                    write: bool = True, dist_state=None) -> dict:
    """Dense metrics, params and FLOPs (measured once; kept in ``dense.json`` for resume); the
    main process (``write``) also saves the dense model under ``state/dense-model``."""
    dense_file = out / "dense.json"
    if write and not (out / "state" / DENSE_DIR / "config.json").is_file():
        with _quiet_transformers():
            write_dir_atomic(out / "state" / DENSE_DIR, model.save_pretrained)
    if resume and dense_file.is_file():
        return json.loads(dense_file.read_text())
    if write:
        print(f"evaluating the dense model on {len(test)} test samples")
    dense = {**measure(model, task, processor, test),
             "metrics": task.evaluate(model, test, processor, config.eval_batch_size, accelerator=dist_state)}
    if not write:
        return dense
    run_info = {"task": task.name, "base_model": base_model, "data": str(data or ""), "config": config.to_dict()}
    (out / "run.json").write_text(json.dumps(run_info, indent=1, sort_keys=True) + "\n")
    tmp = out / ".dense.json.tmp"
    tmp.write_text(json.dumps(dense, indent=1, sort_keys=True))
    os.replace(tmp, dense_file)
    return dense


def compress(
    model: nn.Module,
    task: str | Task = "retrieval",
    data: str | os.PathLike | None = None,
    *,
    train=None,
    val=None,
    test=None,
    processor=None,
    config: UPopConfig | None = None,
    out_dir: str | os.PathLike = "upop-out",
    resume: bool = False,
    overwrite: bool = False,
    base_model: str = "",
    progress: bool = True,
    log: Callable[[str], None] = print,
    stop_after: int | None = None,
) -> CompressResult:
    """Compress ``model`` with UPop on ``task`` and write the checkpoint and report to ``out_dir``.

    Give ``data`` (a folder in the task's format) or the ``train``/``val``/``test`` datasets.
    ``processor`` turns images and text into model inputs (saved with the checkpoint).
    Returns the compressed model (loaded back from ``out_dir/compressed``), its plan and the report.
    """
    config = config or UPopConfig()
    config.validate()
    task = get_task(task)
    task.check_model(model)
    if processor is None:
        raise ConfigError("processor is required (the model's image processor and tokenizer)")
    if data is not None:
        splits = task.load_splits(data)
        train, val, test = splits["train"], splits["val"], splits["test"]
    if train is None or val is None:
        raise ConfigError("give data=FOLDER or train= and val= datasets")
    test = test if test is not None else val
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    out = Path(out_dir)
    created = not out.exists()
    if state.is_main_process:  # only the main process touches the output folder
        prepare_output(out, resume, overwrite)
    base_model = base_model or str(getattr(model.config, "_name_or_path", "") or "")
    try:
        if state.is_main_process:
            check_output_dir(out, min_free_bytes=4 * _model_bytes(model) + 50 * 2**20)
        state.wait_for_everyone()
        dense_class = type(model)
        dense = _dense_baseline(model, task, processor, test, config, out, resume, base_model, data,
                                write=state.is_main_process, dist_state=state)
        state.wait_for_everyone()
    except BaseException:
        if created:  # nothing of a rejected run is left behind
            shutil.rmtree(out, ignore_errors=True)
        raise

    run = Run(model, task, train, val, config, processor, out, resume=resume, base_model=base_model, log=log,
              progress=progress, stop_after=stop_after)
    result = run.run()

    compressed = load_compressed(out / "compressed")
    log(f"evaluating the compressed model on {len(test)} test samples")
    comp = {**measure(compressed, task, processor, test), "metrics": task.evaluate(compressed, test, processor, config.eval_batch_size,
                                                                             accelerator=state)}
    inputs = task.example_inputs(compressed, processor, test, config.latency_batch_size)
    torch.manual_seed(0)
    with _quiet_transformers():
        dense_model = dense_class.from_pretrained(str(out / "state" / DENSE_DIR)).eval()
    dense["latency_ms"], comp["latency_ms"] = paired_latency(dense_model, compressed, inputs, seconds=config.latency_time)
    del dense_model
    report = build_report(
        task=task.name, plan=result.plan, dense=dense, compressed=comp, target_ratio=config.ratio, cost=config.cost,
        settings=config.to_dict(),
        latency_input=f"FLOPs: one test sample; latency: batch {config.latency_batch_size} of the test split, "
        + (f"{torch.get_num_threads()} CPU threads" if not torch.cuda.is_available() else torch.cuda.get_device_name()),
    )
    report["validation"] = {"best": result.best_metrics, "history": result.history}
    report["processes"] = state.num_processes
    if state.is_main_process:
        write_report(report, out)
    state.wait_for_everyone()
    if state.is_main_process:
        shutil.rmtree(out / "state" / DENSE_DIR, ignore_errors=True)
    return CompressResult(model=compressed, plan=result.plan, report=report, out_dir=out)


def evaluate(model_or_path, task: str | Task, data, split: str = "test", processor=None, batch_size: int = 64) -> dict[str, float]:
    """Metrics of a model (or a compressed/dense checkpoint folder) on a split of ``data``."""
    from .models import load_any

    task = get_task(task)
    if isinstance(model_or_path, (str, os.PathLike)):
        model, loaded_processor = load_any(model_or_path)
        processor = processor or loaded_processor
    else:
        model = model_or_path
    task.check_model(model)
    dataset = task.load_splits(data, splits=(split,))[split]
    return task.evaluate(model, dataset, processor, batch_size)
