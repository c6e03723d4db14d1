"""``upop export``: a model folder (compressed or dense) to ONNX, checked in ONNX Runtime.

:func:`export_onnx` loads the folder (:func:`upop.models.folders.load_any`, float32 on the CPU), wraps it
in a graph of plain tensors in and out (:class:`Graph`) and exports it with ``torch.onnx.export``:
the dynamo exporter (``torch.export``) first, the TorchScript exporter if that is unavailable or
fails (``exporter="auto"``; the result says which ran and why). The batch axis is dynamic, and so
is the sequence axis of token inputs (up to ``max_position_embeddings``); images have the
config's ``image_size``.

Inputs are built from the config: ``pixel_values`` (B, C, H, W) of standard-normal values;
``input_ids`` drawn from the vocabulary, with ``attention_mask`` padding the end of every other
row (so the masking path is checked too); ``token_type_ids`` zeros (BERT). Outputs are the
tensors of the model's forward output (``logits``, ``image_embeds``, ...), or with ``part`` one
tower (:mod:`upop.export.graph`): of CLIP and SigLIP ``vision`` -> ``image_embeds``, ``text`` ->
``text_embeds`` (the L2-normalised projections, the same values as the whole model's outputs of
that name; SigLIP2: ``text`` only), of BLIP's four classes ``vision`` -> the vision model's
``last_hidden_state`` and ``pooler_output``. BLIP's whole models and text towers (decoding loops,
two-mode or image-pair forwards) and SigLIP2's NaFlex vision tower are refused with the reason.

With ``pooling`` (:mod:`upop.export.graph`, :func:`upop.export.graph.resolve_pooling`) a text encoder
exports as a sentence embedder: ``input_ids``, ``attention_mask`` (``token_type_ids`` where the
config has token types) -> ``last_hidden_state`` and ``sentence_embedding``.

Where it is written: an ``out`` ending in ``.onnx`` is that one file. Any other ``out`` is a folder
(new, or empty; with ``overwrite``, one holding files) that optimum's ``ORTModel`` classes load as
they load their own exports: ``model.onnx``; ``config.json``, the model's transformers config under
its plain model type (``"bert"``, never a compressed folder's ``upop_bert``, no ``auto_map``, so
``AutoConfig`` reads it without remote code; its widths are the dense model's, the graph's are the
pruned ones); the tokenizer / processor files of the model's folder; and a sentence-transformers
folder's ``modules.json``, module folders and configs. The files are written in a temporary
sibling folder; a new ``out`` is that folder renamed; in an existing ``out`` each file is renamed in
(the graph last), replacing a file of the same name only with ``overwrite``; no other file in ``out``
is ever replaced or deleted.

Parity: the file runs in ONNX Runtime at ``batch`` and ``batch + 1`` (and two sequence lengths)
and every output must satisfy ``max |onnx - torch| <= tolerance * max(1, max |torch|)``: relative
to the output's scale, absolute for outputs within +-1. The file is written under a temporary name
and renamed to ``out`` only after the check passed; an existing ``out`` is replaced only with
``overwrite``. With ``dense`` (the folder of the model before pruning) that model is exported too
(to a temporary file, checked alike) and both files are timed in ONNX Runtime on the same input
in interleaved rounds (:func:`upop.measure.latency.timed_rounds`, :func:`upop.runs.report.paired_summary`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from upop.errors import CheckpointError, ConfigError, UnsupportedModelError, show
from upop.runs.atomic import fsync_dir, fsync_tree, make_temp_dir
from upop.runs.rundir import check_out_dir
from upop.export.graph import (REFUSED, TOWERS, TWO_TOWERS, graph_of, example_inputs)  # noqa: F401 - upop.export.onnx.<name>
from upop.export.graph import PARTS, dynamic_axes, Graph, max_text_tokens
from upop.export.options import FILE_SUFFIX, FORMATS, MODEL_FILE, POOLINGS
from upop.export.ort import ort_outputs, ort_paired_latency, ort_session
from upop.models.sentence_transformers import Pooling

INSTALL = 'pip install "upop[onnx]" (in a clone of upop: pip install -e ".[onnx]")'
DEFAULT_TOLERANCE = 1e-3
EXPORTERS = ("auto", "dynamo", "torchscript")


def require_onnx():
    """``(onnx, onnxruntime)``, or a one-line ConfigError saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ConfigError(f"upop export needs onnx, onnxruntime and onnxscript ({exc.name or 'onnx'} is not "
                          f"installed): {INSTALL}") from None
    return onnx, onnxruntime


@dataclass
class Parity:
    """One parity check at ``batch`` (and ``sequence`` tokens): the largest absolute difference
    over the outputs, and the largest relative to its output's scale."""

    batch: int
    sequence: int | None
    max_abs_diff: float
    relative: float


@dataclass
class ExportResult:
    """What :func:`export_onnx` did; :meth:`summary` is what ``upop export`` prints."""

    path: Path  # the .onnx file
    model_class: str
    part: str | None
    exporter: str  # "dynamo" or "torchscript": the one that wrote the file
    fallback_reason: str | None  # why the dynamo exporter was not used (exporter "auto")
    opset: int | None
    inputs: dict[str, list]  # name -> shape, dynamic axes by name
    outputs: list[str]
    tolerance: float
    provider: str
    parity: list[Parity] = field(default_factory=list)
    dense_parity: list[Parity] = field(default_factory=list)
    latency: dict[str, Any] | None = None  # paired_summary fields + batch, threads, provider
    folder: Path | None = None  # the folder written (None: one file)
    files: list[str] = field(default_factory=list)  # the folder's files, relative
    pooling: str | None = None  # e.g. "mean + normalize (the sentence-transformers pipeline of modules.json)"

    def summary(self) -> str:
        exporter = {"dynamo": "the dynamo exporter (torch.export)", "torchscript": "the TorchScript exporter"}
        what = f" ({self.part} tower)" if self.part else " as a sentence embedder" if self.pooling else ""
        lines = [f"exported {self.model_class}{what} to {self.path} with "
                 f"{exporter[self.exporter]}" + (f", after the dynamo exporter failed: {self.fallback_reason}"
                                                 if self.fallback_reason else "") + f"; opset {self.opset}, float32",
                 *([f"sentence_embedding: {self.pooling} pooling of last_hidden_state"] if self.pooling else []),
                 *([f"folder {self.folder}: {', '.join(self.files)}"] if self.folder is not None else []),
                 "inputs: " + ", ".join(f"{k} [{', '.join(map(str, v))}]" for k, v in self.inputs.items())
                 + f"; outputs: {', '.join(self.outputs)}",
                 f"parity with PyTorch in ONNX Runtime ({self.provider}): {_parity_text(self.parity)} (limit "
                 f"{self.tolerance:g} x max(1, max |output|))"]
        if self.latency is not None:
            lat, spread = self.latency, self.latency["speedup_spread"]
            lines += [f"dense export parity: {_parity_text(self.dense_parity)}",
                      f"ONNX Runtime latency, batch {lat['batch']}, {lat['threads']} thread(s), median of "
                      f"{lat['rounds']} interleaved rounds: dense {lat['dense_ms']:.3f} ms, compressed "
                      f"{lat['compressed_ms']:.3f} ms, speedup {lat['speedup']:.2f}x (per round {spread['min']:.2f}-"
                      f"{spread['max']:.2f}x{'; noisy: re-time on a quiet machine' if lat['noisy'] else ''})"]
        return "\n".join(lines)


def _parity_text(checks: list[Parity]) -> str:
    return "; ".join(f"batch {p.batch}{'' if p.sequence is None else f' x {p.sequence} tokens'}: max abs diff "
                     f"{p.max_abs_diff:.2e} ({p.relative:.2e} of scale)" for p in checks)


@contextlib.contextmanager
def _quiet():
    """The exporters' warnings and log lines (tracer warnings, missing torchvision ops) hidden."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def _export_with(dynamo: bool, graph: Graph, inputs: dict, path: Path, opset: int | None) -> None:
    """One ``torch.onnx.export`` call: dynamo (``torch.export``; weights over 1.5 GiB go to an
    external ``.data`` file next to the graph) or TorchScript."""
    axes = dynamic_axes(graph, inputs)
    kwargs: dict[str, Any] = {} if opset is None else {"opset_version": opset}
    if dynamo:
        from torch.export import Dim

        dims = {"batch": Dim("batch", min=1, max=1 << 20), "sequence": Dim("sequence", min=1, max=max_text_tokens(graph.model))}
        # forward(*args): the inputs are one tuple, and so are their dynamic shapes
        kwargs.update(dynamic_shapes=(tuple({a: dims[d] for a, d in axes[n].items()} for n in graph.input_names),),
                      external_data=sum(p.numel() * p.element_size() for p in graph.parameters()) > 1.5 * 2 ** 30)
    else:
        kwargs["dynamic_axes"] = axes
    torch.onnx.export(graph, tuple(inputs.values()), str(path), input_names=graph.input_names,
                      output_names=graph.output_names, dynamo=dynamo, verbose=False, **kwargs)


def _export_dynamo(graph: Graph, inputs: dict, path: Path, opset: int | None) -> None:
    _export_with(True, graph, inputs, path, opset)


def _export_torchscript(graph: Graph, inputs: dict, path: Path, opset: int | None) -> None:
    _export_with(False, graph, inputs, path, opset)


def _export(graph: Graph, inputs: dict, path: Path, opset: int | None, exporter: str) -> tuple[str, str | None]:
    """Export with ``exporter``; returns (the exporter that wrote the file, why dynamo was not used)."""
    failures: list[str] = []
    for name, run in (("dynamo", _export_dynamo), ("torchscript", _export_torchscript)):
        if exporter not in ("auto", name):
            continue
        try:
            with _quiet(), torch.no_grad():
                run(graph, inputs, path, opset)
            return name, (failures[0].split(": ", 1)[1] if failures else None)
        except Exception as exc:  # noqa: BLE001 - any exporter failure: try the next one, report both
            failures.append(f"{name}: {_reason(exc)}")
            for leftover in path.parent.iterdir():  # what the failed exporter half-wrote
                if leftover.is_file():
                    leftover.unlink()
    raise UnsupportedModelError(f"cannot export {graph.source} to ONNX ({'; '.join(failures)})")


def _reason(exc: BaseException) -> str:
    """The root cause of an exporter's exception, in one line (the wrappers' advice left out)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    first = re.sub(r"\x1b\[[0-9;]*m", "", (str(exc).strip().splitlines() or [""])[0])
    return f"{type(exc).__name__}: {first[:200]}"


def _check_parity(graph: Graph, session, batch: int, sequence: int, tolerance: float, where: str,
                  exporter: str) -> list[Parity]:
    """Run ``session`` and ``graph`` at ``batch`` x ``sequence`` and at ``batch + 1`` x a shorter
    sequence; refuse a difference above the tolerance."""
    checks = []
    for i, (b, s) in enumerate(((batch, sequence), (batch + 1, max(2, sequence - 5)))):
        inputs = example_inputs(graph, b, s, seed=100 + i)
        with torch.no_grad():
            expected = [t.float() for t in graph(*inputs.values())]
        worst_abs = worst_rel = 0.0
        try:
            got_all = ort_outputs(session, inputs)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime's errors have no common public base
            raise UnsupportedModelError(
                f"{where}: ONNX Runtime cannot run the {exporter} exporter's graph at batch {b}"
                f"{'' if graph.input_names == ['pixel_values'] else f' x {s} tokens'} ({_reason(exc)}); the exporter "
                "fixed an axis that must stay dynamic, and the file was not kept") from None
        for name, ref, got in zip(graph.output_names, expected, got_all):
            if tuple(got.shape) != tuple(ref.shape):
                raise UnsupportedModelError(f"{where}: output {name} has shape {tuple(got.shape)} in ONNX Runtime "
                                            f"but {tuple(ref.shape)} in PyTorch (batch {b}); the export is wrong")
            diff = float(np.nan_to_num(np.abs(got - ref.numpy()), nan=np.inf).max(initial=0.0))
            scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
            worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, diff / scale)
            if diff > tolerance * scale:
                raise UnsupportedModelError(
                    f"{where}: output {name} differs from PyTorch by up to {diff:.3g} at batch {b} (limit "
                    f"{tolerance:g} x {scale:.3g}) with the {exporter} exporter; the file was not kept (try "
                    f"--exporter {'torchscript' if exporter == 'dynamo' else 'dynamo'}, or a larger --tolerance if the "
                    "difference is acceptable)")
        checks.append(Parity(b, None if graph.input_names == ["pixel_values"] else s, worst_abs, worst_rel))
    return checks


def _write(graph: Graph, path: Path, batch: int, sequence: int, opset, exporter, tolerance, ort, what: str):
    """Export ``graph`` to ``path`` and check it: (exporter used, why not dynamo, session, parity)."""
    trace = example_inputs(graph, max(2, batch), sequence, seed=0)  # dynamo specialises a batch of 1
    with torch.no_grad():
        graph(*trace.values())  # fixes the output names
    used, why = _export(graph, trace, path, opset, exporter)
    session = ort_session(ort, path)
    return used, why, session, _check_parity(graph, session, batch, sequence, tolerance, what, used)


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def is_folder_out(out: str | os.PathLike) -> bool:
    """Whether ``out`` names a folder to write (any path not ending in ``.onnx``)."""
    return Path(out).suffix.lower() != FILE_SUFFIX


def _check_options(out: Path, overwrite: bool, part, batch, opset, tolerance, exporter, latency_time, onnx,
                   pooling, fmt) -> None:
    top = onnx.defs.onnx_opset_version()
    for bad, name, value, allowed in (
            (fmt not in FORMATS, "format", fmt, f"one of: {', '.join(FORMATS)}"),
            (not isinstance(pooling, Pooling) and pooling not in POOLINGS, "pooling", pooling,
             f"one of: {', '.join(POOLINGS)} (or a Pooling)"),
            (part is not None and part not in PARTS, "part", part, f"one of: {', '.join(PARTS)}"),
            (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1, "batch", batch, "an integer >= 1"),
            (opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or not 7 <= opset <= top),
             "opset", opset, f"an integer from 7 to {top} (this onnx)"),
            (not _positive(tolerance), "tolerance", tolerance, "a finite number > 0"),
            (exporter not in EXPORTERS, "exporter", exporter, f"one of: {', '.join(EXPORTERS)}"),
            (not _positive(latency_time), "latency_time", latency_time, "a number of seconds > 0")):
        if bad:
            raise ConfigError(f"{name} {show(value)} is not allowed; need {allowed}")
    if is_folder_out(out):
        _check_folder_out(out, overwrite)
        return
    if out.is_dir():
        raise ConfigError(f"--out {show(out)} is a folder whose name ends in {FILE_SUFFIX}; a path ending in "
                          f"{FILE_SUFFIX} is the one file to write, any other path a folder to write")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {show(out)}: the folder {show(out.parent)} does not exist; create it first")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise ConfigError(f"--out {show(out)} exists; pass --overwrite to replace it")


def _check_folder_out(out: Path, overwrite: bool) -> None:
    """An ``out`` folder that may be written: not a link or a file, in an existing folder, and
    new or empty unless ``overwrite``."""
    if out.is_symlink():
        raise ConfigError(f"--out {show(out)} is a symbolic link; upop never writes through links, give a folder")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {show(out)} exists and is not a folder; give a folder to write, or a path ending "
                          f"in {FILE_SUFFIX} for one file")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {show(out)}: the folder {show(out.parent)} does not exist; create it first")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {show(out)} is a folder that already holds files; pass --overwrite to replace "
                          f"the files of the same names upop export writes ({MODEL_FILE}, config.json, tokenizer "
                          "files...; no other file is touched), or give a new or empty folder")


def _model_folder(model) -> Path | None:
    """The local folder ``model`` (a folder, a Hub id or a module) comes from, or None."""
    if isinstance(model, nn.Module):
        from upop.models.sentence_transformers import model_folder

        name = model_folder(model)
        return Path(name) if name and Path(name).is_dir() else None
    from upop.checkpoint.safe_load import local_folder

    return local_folder(model)


def export_onnx(model, out: str | os.PathLike, *, part: str | None = None, dense=None, batch: int = 2,
                opset: int | None = None, tolerance: float = DEFAULT_TOLERANCE, overwrite: bool = False,
                exporter: str = "auto", latency_time: float = 0.5, pooling: str | Pooling = "none",
                format: str = "onnx") -> ExportResult:
    """Export ``model`` (a model folder, compressed or dense, or a module) to ONNX at ``out`` (a
    ``.onnx`` file, or a folder for optimum: see the module docstring) and check it in ONNX
    Runtime; with ``dense``, time it against the dense model. ``batch``: the batch of the check and
    of the timing; ``exporter``: ``"auto"`` (dynamo, else TorchScript), ``"dynamo"`` or
    ``"torchscript"``; ``latency_time``: each model is timed ``3 x`` this many seconds over 7
    rounds; ``pooling``: one of :data:`upop.export.options.POOLINGS` (``"none"``: the model's own
    outputs; see :mod:`upop.export.graph`) or a :class:`~upop.models.sentence_transformers.Pooling`
    (any modes, concatenated; text encoders only); ``format``: ``"onnx"``."""
    onnx, ort = require_onnx()
    out = check_out_dir(out, {"model": None if isinstance(model, nn.Module) else model,
                              "dense model": None if dense is None or isinstance(dense, nn.Module) else dense})
    _check_options(out, overwrite, part, batch, opset, tolerance, exporter, latency_time, onnx, pooling, format)
    folder = _model_folder(model)
    what = type(model).__name__ if isinstance(model, nn.Module) else show(model)
    graph = graph_of(model if isinstance(model, nn.Module) else folder, part, what, pooling=pooling, folder=folder)
    dense_graph = None if dense is None else graph_of(dense, part, "--dense", pooling=graph.pooling or "none")
    if dense_graph is not None and dense_graph.source != graph.source:
        raise ConfigError(f"--dense is a {dense_graph.source}, the model a {graph.source}; "
                          "give the dense model the compressed one was pruned from")
    sequence = min(16, max_text_tokens(graph.model))
    inputs = example_inputs(graph, batch, sequence)
    as_folder = is_folder_out(out)
    name = MODEL_FILE if as_folder else out.name
    tmp = make_temp_dir(out)
    try:
        used, why, session, parity = _write(graph, tmp / name, batch, sequence, opset, exporter, tolerance, ort,
                                            show(model) if not isinstance(model, nn.Module) else "the model")
        axes = dynamic_axes(graph, inputs)
        result = ExportResult(path=out / name if as_folder else out, model_class=graph.source, part=part, exporter=used,
                              fallback_reason=why, opset=_opset(onnx, tmp / name),
                              inputs={n: [axes[n].get(i, d) for i, d in enumerate(t.shape)] for n, t in inputs.items()},
                              outputs=list(graph.output_names), tolerance=tolerance,
                              provider=session.get_providers()[0], parity=parity,
                              pooling=None if graph.pooling is None else
                              f"{graph.pooling.describe()} ({graph.pooling_source})")
        if dense_graph is not None:
            (tmp / "dense").mkdir()
            *_, dense_session, result.dense_parity = _write(dense_graph, tmp / "dense" / "dense.onnx", batch, sequence,
                                                            opset, used, tolerance, ort, "--dense")
            result.latency = ort_paired_latency(dense_session, session, inputs, latency_time, batch)
            shutil.rmtree(tmp / "dense")
        if as_folder:
            del session  # the file is renamed below
            result.folder = out
            result.files = _fill_folder(tmp, graph, folder)
            _place_folder(tmp, out, overwrite)
        else:
            _move_into_place(tmp, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _opset(onnx, path: Path) -> int | None:
    proto = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _plain_config(graph: Graph) -> dict[str, Any]:
    """The exported model's transformers config as ``config.json`` for optimum: its plain model
    type (:func:`upop.checkpoint.hub.base_model_type`), no ``auto_map`` nor upop's shapes, and with
    pooling the base encoder's class as ``architectures``."""
    from upop.checkpoint.allow_list import find_hook
    from upop.checkpoint.hub import SHAPES_KEY, base_model_type

    data = json.loads(graph.model.config.to_json_string())
    data["model_type"] = base_model_type(data)
    for key in ("auto_map", SHAPES_KEY, "_name_or_path"):
        data.pop(key, None)
    if graph.pooling is not None:
        data["architectures"] = [type(graph.model).__name__]
    problem = find_hook(data)
    if problem is not None:
        raise CheckpointError(f"the model's config {problem}; upop export writes no key that makes a library "
                              "import code")
    return data


def _fill_folder(tmp: Path, graph: Graph, folder: Path | None) -> list[str]:
    """Write ``config.json``, the tokenizer / processor files and a sentence-transformers
    pipeline's files of ``folder`` into ``tmp`` (which holds the graph); returns the files, relative."""
    from upop.checkpoint.allow_list import refuse_folder_hooks
    from upop.checkpoint.safe_load import read_json
    from upop.models.folders import load_processor_or_none
    from upop.models.sentence_transformers import TOKENIZER_FILES, carried_pipeline

    config = json.dumps(_plain_config(graph), indent=2, sort_keys=True) + "\n"
    (tmp / "config.json").write_text(config, encoding="utf-8")
    processor = load_processor_or_none(folder) if folder is not None else None
    if processor is not None:
        processor.save_pretrained(tmp)
    pipeline = carried_pipeline(folder) if folder is not None else None  # None (a warning) for one upop cannot carry
    if pipeline is not None:
        for rel in pipeline.files():
            if rel in TOKENIZER_FILES and (tmp / rel).exists():
                continue
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / rel, tmp / rel)
        for sub in pipeline.module_dirs():
            (tmp / sub).mkdir(exist_ok=True)
    refuse_folder_hooks(tmp, read_json, "the exported folder's")
    return sorted(p.relative_to(tmp).as_posix() + ("/" if p.is_dir() else "") for p in tmp.rglob("*")
                  if p.is_file() or (p.is_dir() and not any(p.iterdir())))


def _place_folder(tmp: Path, out: Path, overwrite: bool) -> None:
    """``tmp`` becomes ``out``: renamed when ``out`` does not exist, else its files renamed into
    ``out`` one by one, the graph last, after every target was checked (see the module docstring)."""
    fsync_tree(tmp)
    if not os.path.lexists(out):
        os.rename(tmp, out)
        fsync_dir(out.parent)
        return
    _check_folder_out(out, overwrite)  # again: the folder may have changed during the export
    entries = sorted(tmp.rglob("*"), key=lambda p: (p.name == MODEL_FILE, p.relative_to(tmp).parts))
    for src in entries:
        rel = src.relative_to(tmp)
        for parent in list(reversed(rel.parents))[1:]:
            if (out / parent).is_symlink() or ((out / parent).exists() and not (out / parent).is_dir()):
                raise ConfigError(f"{show(out / parent)} is not a folder; upop export would write "
                                  f"{show(rel.as_posix())} into it: move it away or give another --out")
        target = out / rel
        if src.is_dir():
            if target.is_symlink() or (target.exists() and not target.is_dir()):
                raise ConfigError(f"{show(target)} is not a folder; move it away or give another --out")
        elif target.is_dir() and not target.is_symlink():
            raise ConfigError(f"{show(target)} is a folder where upop export writes a file; move it away or give "
                              "another --out")
        elif os.path.lexists(target) and not overwrite:
            raise ConfigError(f"{show(target)} exists; pass --overwrite to replace it")
    for src in entries:
        target = out / src.relative_to(tmp)
        if src.is_dir():
            target.mkdir(exist_ok=True)
        else:
            os.replace(src, target)
            fsync_dir(target.parent)


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the files in ``tmp`` next to ``out``: external weight files first, the graph last."""
    extra = [p for p in tmp.iterdir() if p.name != out.name]
    for p in extra:
        if (out.parent / p.name).exists() and not overwrite:
            raise ConfigError(f"{show(out.parent / p.name)} exists (the weights file of {show(out)}); pass "
                              "--overwrite to replace it")
    for p in extra:
        os.replace(p, out.parent / p.name)
    os.replace(tmp / out.name, out)


__all__ = ["DEFAULT_TOLERANCE", "EXPORTERS", "ExportResult", "Parity", "example_inputs", "export_onnx", "is_folder_out",
           "require_onnx"]
