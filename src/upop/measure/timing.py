"""How upop times a call on a device: one code path that chooses the clock by the device type.

- CUDA: a pair of ``torch.cuda.Event(enable_timing=True)`` around each call, recorded on the
  stream; the host never waits between calls (a ``synchronize`` per call would add the host's
  launch gap to every sample) and synchronises once, at the end of the round, before reading the
  events. What is timed is the GPU's own time of each call.
- CPU (and any other device): ``time.perf_counter`` around each call, after the device's
  ``synchronize`` where it has one.

:func:`clock_name` is the clock a device gets (recorded in every latency result, so a report says
how it was timed); :func:`time_calls` times a call repeatedly for a while.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

EVENTS = "cuda-events"
"""The clock of a CUDA device: CUDA event pairs, read after one synchronise per round."""

WALL = "perf-counter"
"""The clock of the CPU and other devices: the host's ``time.perf_counter``."""

MAX_CALLS = 10_000
"""Most calls one round times with CUDA events (each holds two events until the round's end)."""


def clock_name(device: torch.device | str) -> str:
    """The clock upop times calls on ``device`` with: :data:`EVENTS` on CUDA, else :data:`WALL`."""
    return EVENTS if torch.device(device).type == "cuda" else WALL


def _device_sync(device: torch.device) -> Callable[[], None]:
    """What waits for ``device``'s queued work (nothing on the CPU)."""
    if device.type == "cpu":
        return lambda: None
    module = getattr(torch, device.type, None)
    sync = getattr(module, "synchronize", None)
    return (lambda: sync(device)) if sync is not None else (lambda: None)


def time_calls(call: Callable[[], Any], seconds: float, device: torch.device | str, *,
               event: Callable[..., Any] | None = None, synchronize: Callable[[torch.device], None] | None = None
               ) -> list[float]:
    """Milliseconds of each of the calls of ``call()`` made for ``seconds`` (at least one) on
    ``device``, with the clock of :func:`clock_name`. On CUDA, ``event`` and ``synchronize`` default
    to ``torch.cuda.Event`` and ``torch.cuda.synchronize`` (given, they let the CUDA path run on a
    machine without one, for tests)."""
    device = torch.device(device)
    if clock_name(device) == EVENTS:
        return _event_times(call, seconds, device, event or torch.cuda.Event, synchronize or torch.cuda.synchronize)
    sync = _device_sync(device)
    times: list[float] = []
    stop = time.perf_counter() + seconds
    while not times or time.perf_counter() < stop:
        start = time.perf_counter()
        call()
        sync()
        times.append(1e3 * (time.perf_counter() - start))
    return times


def _event_times(call: Callable[[], Any], seconds: float, device: torch.device, event, synchronize) -> list[float]:
    """CUDA event pairs around each call, enqueued for ``seconds`` of host time (at most
    :data:`MAX_CALLS`), one ``synchronize`` at the end, then each pair's elapsed milliseconds."""
    pairs = []
    stop = time.perf_counter() + seconds
    while not pairs or (time.perf_counter() < stop and len(pairs) < MAX_CALLS):
        start, end = event(enable_timing=True), event(enable_timing=True)
        start.record()
        call()
        end.record()
        pairs.append((start, end))
    synchronize(device)  # once per round: the events are read only after the GPU reached the last one
    return [float(start.elapsed_time(end)) for start, end in pairs]
