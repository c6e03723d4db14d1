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

from upop.errors import ConfigError, UnsupportedModelError, show
from upop.runs.rundir import check_out_dir
from upop.export.graph import (REFUSED, TOWERS, TWO_TOWERS, graph_of, example_inputs)  # noqa: F401 - upop.export.onnx.<name>
from upop.export.graph import PARTS, dynamic_axes, Graph, max_text_tokens
from upop.export.ort import ort_outputs, ort_paired_latency, ort_session

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

    path: Path
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

    def summary(self) -> str:
        exporter = {"dynamo": "the dynamo exporter (torch.export)", "torchscript": "the TorchScript exporter"}
        lines = [f"exported {self.model_class}{f' ({self.part} tower)' if self.part else ''} to {self.path} with "
                 f"{exporter[self.exporter]}" + (f", after the dynamo exporter failed: {self.fallback_reason}"
                                                 if self.fallback_reason else "") + f"; opset {self.opset}, float32",
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
        for name, ref, got in zip(graph.output_names, expected, ort_outputs(session, inputs)):
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


def _check_options(out: Path, overwrite: bool, part, batch, opset, tolerance, exporter, latency_time, onnx) -> None:
    top = onnx.defs.onnx_opset_version()
    for bad, name, value, allowed in (
            (part is not None and part not in PARTS, "part", part, f"one of: {', '.join(PARTS)}"),
            (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1, "batch", batch, "an integer >= 1"),
            (opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or not 7 <= opset <= top),
             "opset", opset, f"an integer from 7 to {top} (this onnx)"),
            (not _positive(tolerance), "tolerance", tolerance, "a finite number > 0"),
            (exporter not in EXPORTERS, "exporter", exporter, f"one of: {', '.join(EXPORTERS)}"),
            (not _positive(latency_time), "latency_time", latency_time, "a number of seconds > 0")):
        if bad:
            raise ConfigError(f"{name} {show(value)} is not allowed; need {allowed}")
    if out.is_dir():
        raise ConfigError(f"--out {show(out)} is a folder; give the path of the .onnx file to write")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {show(out)}: the folder {show(out.parent)} does not exist; create it first")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise ConfigError(f"--out {show(out)} exists; pass --overwrite to replace it")


def export_onnx(model, out: str | os.PathLike, *, part: str | None = None, dense=None, batch: int = 2,
                opset: int | None = None, tolerance: float = DEFAULT_TOLERANCE, overwrite: bool = False,
                exporter: str = "auto", latency_time: float = 0.5) -> ExportResult:
    """Export ``model`` (a model folder, compressed or dense, or a module) to the ONNX file ``out``
    and check it in ONNX Runtime; with ``dense``, time it against the dense model (see the module
    docstring). ``batch``: the batch of the check and of the timing; ``exporter``: ``"auto"``
    (dynamo, else TorchScript), ``"dynamo"`` or ``"torchscript"``; ``latency_time``: each model is
    timed ``3 x`` this many seconds over 7 rounds."""
    onnx, ort = require_onnx()
    out = check_out_dir(out, {"model": None if isinstance(model, nn.Module) else model,
                              "dense model": None if dense is None or isinstance(dense, nn.Module) else dense})
    _check_options(out, overwrite, part, batch, opset, tolerance, exporter, latency_time, onnx)
    graph = graph_of(model, part, type(model).__name__ if isinstance(model, nn.Module) else show(model))
    dense_graph = None if dense is None else graph_of(dense, part, "--dense")
    if dense_graph is not None and dense_graph.source != graph.source:
        raise ConfigError(f"--dense is a {dense_graph.source}, the model a {graph.source}; "
                          "give the dense model the compressed one was pruned from")
    sequence = min(16, max_text_tokens(graph.model))
    inputs = example_inputs(graph, batch, sequence)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    tmp.mkdir()
    try:
        used, why, session, parity = _write(graph, tmp / out.name, batch, sequence, opset, exporter, tolerance, ort,
                                            show(model) if not isinstance(model, nn.Module) else "the model")
        axes = dynamic_axes(graph, inputs)
        result = ExportResult(path=out, model_class=graph.source, part=part, exporter=used,
                              fallback_reason=why, opset=_opset(onnx, tmp / out.name),
                              inputs={n: [axes[n].get(i, d) for i, d in enumerate(t.shape)] for n, t in inputs.items()},
                              outputs=list(graph.output_names), tolerance=tolerance,
                              provider=session.get_providers()[0], parity=parity)
        if dense_graph is not None:
            (tmp / "dense").mkdir()
            *_, dense_session, result.dense_parity = _write(dense_graph, tmp / "dense" / "dense.onnx", batch, sequence,
                                                            opset, used, tolerance, ort, "--dense")
            result.latency = ort_paired_latency(dense_session, session, inputs, latency_time, batch)
            shutil.rmtree(tmp / "dense")
        _move_into_place(tmp, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _opset(onnx, path: Path) -> int | None:
    proto = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


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


__all__ = ["DEFAULT_TOLERANCE", "EXPORTERS", "ExportResult", "Parity", "example_inputs", "export_onnx", "require_onnx"]
