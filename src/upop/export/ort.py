"""ONNX Runtime for :mod:`upop.export.onnx`: sessions, their outputs, and the dense-vs-compressed timing
(interleaved rounds, as the report times PyTorch models: :func:`upop.measure.latency.timed_rounds`)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from upop.errors import ConfigError


def ort_session(ort, path: Path):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = torch.get_num_threads()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    return ort.InferenceSession(str(path), options, providers=providers[:1])


def ort_outputs(session, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    wanted = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v.numpy() for k, v in inputs.items() if k in wanted})


class _Timed(nn.Module):
    """An ONNX Runtime session as a module, so :func:`upop.measure.latency.timed_rounds` can time it."""

    def __init__(self, session):
        super().__init__()
        self.session = session


def _session_ms(module: _Timed, feed: dict, seconds: float) -> float:
    """Median milliseconds of one run of the session, over runs repeated for ``seconds`` (>= 1 run)."""
    times: list[float] = []
    stop = time.perf_counter() + seconds
    while not times or time.perf_counter() < stop:
        start = time.perf_counter()
        module.session.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def ort_paired_latency(dense_session, session, inputs: dict[str, torch.Tensor], seconds: float, batch: int) -> dict:
    from upop.measure.latency import timed_rounds
    from upop.runs.report import paired_summary

    feed = [{i.name: inputs[i.name].numpy() for i in s.get_inputs()} for s in (dense_session, session)]
    if feed[0].keys() != feed[1].keys():
        raise ConfigError("the dense and the compressed ONNX graphs take different inputs; cannot time them alike")
    dense_ms, compressed_ms = timed_rounds([_Timed(dense_session), _Timed(session)], feed[0], seconds=seconds,
                                           timer=_session_ms)
    return {**paired_summary(dense_ms, compressed_ms), "batch": batch, "threads": torch.get_num_threads(),
            "provider": session.get_providers()[0]}
