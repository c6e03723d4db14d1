"""Latency as upop reports it: the dense and the compressed model timed on the same input in
interleaved rounds (machine noise hits both alike), the median per-round speedup with its spread,
and a noise flag (:func:`upop.runs.report.is_noisy`); :func:`time_models` is ``upop evaluate --latency``.

Each forward is timed with the device's clock (:mod:`upop.measure.timing`: CUDA events on a GPU, the
host's counter on the CPU), at the run's ``latency_batch_size`` (``auto``: 32 on a GPU, where batch 1
is launch-bound, 1 on the CPU). In a run of several processes only the main process times while the
others wait (:func:`timed_on_main`): processes timing at once on a shared host or interconnect
would time each other."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable

import torch
from torch import nn

from upop.config import UPopConfig, decide_latency_batch
from upop.errors import ConfigError
from upop.measure.timing import clock_name, time_calls
from upop.runs.report import NOISE_RULE, is_noisy, paired_summary, spread
from upop.tasks import Task, get_task
from upop.engine.runtime import eval_autocast, restore_tf32, set_tf32, tf32_enabled

ROUNDS = 7
"""Rounds of a latency measurement: every round times each model once, the order alternating."""

BUDGET = 3
"""Each model is timed for ``BUDGET x seconds`` in all (``latency_time``), split over the rounds."""

WARMUP = 3
"""Untimed forwards of each model before the rounds."""


def forward_ms(model: nn.Module, inputs: dict, seconds: float,
               forward: Callable[[nn.Module, dict], Any] | None = None) -> float:
    """Median milliseconds of one forward of ``model`` on ``inputs`` (``forward(model, inputs)``
    when given, e.g. one tower of a two-tower model), over forwards repeated for ``seconds`` (at
    least one), each timed with the clock of the model's device (:func:`upop.measure.timing.time_calls`:
    CUDA events on a GPU, synchronised once at the end; ``time.perf_counter`` on the CPU)."""
    import statistics

    device = next(model.parameters()).device
    return statistics.median(time_calls(lambda: forward(model, inputs) if forward is not None else model(**inputs),
                                        seconds, device))


@torch.no_grad()
def timed_rounds(models: list[nn.Module], inputs: dict, rounds: int = ROUNDS, seconds: float = 0.5,
                 timer: Callable[[nn.Module, dict, float], float] | None = None,
                 warmup: int = WARMUP) -> list[list[float]]:
    """Per model, its latency (ms) in each of ``rounds`` rounds, after ``warmup`` untimed calls
    each; a round times every model for ``BUDGET * seconds / rounds`` seconds with ``timer``
    (default :func:`forward_ms`), in the given order on even rounds and reversed on odd ones."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds={rounds!r} is not allowed; need an integer >= 1")
    timer = timer or forward_ms
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    per_round = BUDGET * seconds / rounds
    times: list[list[float]] = [[] for _ in models]
    try:
        for _ in range(warmup):
            for m in models:
                timer(m, inputs, 0.0)
        for r in range(rounds):
            order = range(len(models)) if r % 2 == 0 else reversed(range(len(models)))
            for i in order:
                times[i].append(timer(models[i], inputs, per_round))
    finally:
        for m, mode in zip(models, was_training):
            m.train(mode)
    return times


def latency_setup(models: list[nn.Module], inputs: dict, batch: int) -> dict[str, Any]:
    """Where and how the models run: device, its name, dtype, autocast, TF32, batch, CPU threads and
    the clock (:func:`setup_of`)."""
    params = [next(m.parameters()) for m in models]
    return setup_of(params[0].device, [p.dtype for p in params], batch)


def setup_of(device: torch.device | str, dtypes, batch: int) -> dict[str, Any]:
    """The setup record of timings on ``device`` of models in ``dtypes`` at ``batch``: the same keys
    on every device (``device_name`` "CPU" and ``tf32`` None off CUDA; ``timer``: the clock,
    :func:`upop.measure.timing.clock_name`)."""
    device = torch.device(device)
    autocast = None
    if torch.is_autocast_enabled(device.type):
        autocast = str(torch.get_autocast_dtype(device.type)).replace("torch.", "")
    cuda = device.type == "cuda"
    return {"device": str(device), "device_name": torch.cuda.get_device_name(device) if cuda else "CPU",
            "dtype": "/".join(sorted({str(d).replace("torch.", "") for d in dtypes})), "autocast": autocast,
            "tf32": tf32_enabled() if cuda else None, "batch": batch, "threads": torch.get_num_threads(),
            "timer": clock_name(device)}


def timed_on_main(measure: Callable[[], Any], dist, broadcast: Callable[[list], Any] | None = None) -> Any:
    """``measure()`` on the main process of ``dist`` (an Accelerator or PartialState) only; the
    other processes wait at a barrier and receive its result (``broadcast``, default Accelerate's
    ``broadcast_object_list``). Processes timing at the same time share the host and the
    interconnect and would time each other; every process gets the main process's numbers. A
    failure of ``measure`` is raised on every process (on the others as a ``RuntimeError`` naming
    it, marked ``shared``: the main process reports it), so none waits for a result that never comes."""
    box: list = [None]
    error = None
    if dist.is_main_process:
        try:
            box = [("ok", measure())]
        except Exception as exc:  # noqa: BLE001 (re-raised below, after the others were told)
            error = exc
            box = [("error", f"{type(exc).__name__}: {exc}")]
    if dist.num_processes > 1:
        if broadcast is None:
            from accelerate.utils import broadcast_object_list as broadcast
        dist.wait_for_everyone()  # the others wait here while the main process times
        broadcast(box)
    if error is not None:
        raise error
    status, value = box[0]
    if status == "error":
        failed = RuntimeError(f"the main process failed while timing: {value}")
        failed.shared = True
        raise failed
    return value


@contextlib.contextmanager
def tf32_as(device: torch.device | str, on: bool):
    """TF32 matmuls and convolutions on (as a run sets them with ``tf32``) or off, on CUDA only;
    what was set before is restored on exit."""
    if torch.device(device).type != "cuda":
        yield
        return
    before = set_tf32(on)
    try:
        yield
    finally:
        restore_tf32(before)


def paired_latency(dense: nn.Module, compressed: nn.Module, inputs: dict, rounds: int = ROUNDS,
                   seconds: float = 0.5, batch: int | None = None, timer=None, warmup: int = WARMUP) -> dict:
    """Latency of both models on the same input, interleaved over ``rounds`` (:func:`timed_rounds`)
    so machine noise hits both alike: the median latency of each, the median per-round speedup
    (dense / compressed), its spread, the noise flag (:func:`upop.runs.report.is_noisy`) and the setup."""
    dense_ms, compressed_ms = timed_rounds([dense, compressed], inputs, rounds, seconds, timer, warmup)
    if batch is None:
        batch = int(next(v for v in inputs.values() if torch.is_tensor(v)).shape[0])
    return {**paired_summary(dense_ms, compressed_ms), "seconds_per_round": BUDGET * seconds / rounds,
            **latency_setup([dense, compressed], inputs, batch)}



def time_models(model, baseline=None, *, task: str | Task, data, split: str = "test", processor=None,
                batch_size: int | str = "auto", seconds: float = 0.5, precision: str = "fp32", tf32: bool = True,
                rounds: int = ROUNDS, config: UPopConfig | None = None, timer=None) -> dict[str, Any]:
    """Latency of ``model`` alone, or paired with ``baseline`` (e.g. its dense model: speedup =
    baseline / model), measured as a run's report does (:func:`timed_rounds`) on a batch of
    ``batch_size`` real samples of ``split`` of ``data`` (``"auto"``: as a run decides it for the
    device, :func:`upop.config.decide_latency_batch`), with bf16 autocast if ``precision`` is
    bf16 and, on CUDA, TF32 as ``tf32`` says (a run's default: on). Models are folders (loaded
    onto the GPU if there is one) or modules (timed where they are). Noisy: the rule of
    :data:`upop.runs.report.NOISE_LIMIT` on the per-round speedups of a pair, on the per-round
    latencies of a model alone. Returns what ``upop evaluate --latency`` prints."""
    import statistics

    from upop.models.folders import load_any

    config = UPopConfig.from_dict({**(config or UPopConfig()).to_dict(), "latency_batch_size": batch_size,
                                   "latency_time": seconds, "eval_precision": precision, "tf32": tf32},
                                  source="time_models")
    task = get_task(task).configure(config)
    given = [m for m in (model, baseline) if m is not None]
    modules = [m for m in given if not isinstance(m, (str, os.PathLike))]
    target = next(modules[0].parameters()).device if modules else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    batch_size = decide_latency_batch(config.latency_batch_size, target.type)[0]
    models = []
    for m in given:
        if isinstance(m, (str, os.PathLike)):
            m, loaded_processor = load_any(m)
            processor = processor or loaded_processor
            m.to(target)
        task.check_model(m)
        models.append(m)
    devices = [next(m.parameters()).device for m in models]
    if len(set(devices)) > 1:
        raise ConfigError(f"model and baseline are on different devices ({devices[0]} and {devices[1]}); put them "
                          "on one")
    device = devices[0]
    if len(models) == 2 and type(models[0]) is not type(models[1]):
        raise ConfigError(f"the baseline is a {type(models[1]).__name__}, the model a {type(models[0]).__name__}; "
                          "time a model against a baseline of the same class (e.g. its dense model)")
    if processor is None:
        raise ConfigError("no processor: the model folders hold no tokenizer/processor files; pass processor=")
    dataset = task.load_splits(data, splits=(split,))[split]
    inputs = task.example_inputs(models[0], processor, dataset, batch_size)
    with eval_autocast(device, precision), tf32_as(device, tf32):
        times = timed_rounds(models, inputs, rounds, seconds, timer)
        setup = latency_setup(models, inputs, batch_size)
    names = ["model", "baseline"][:len(models)]
    spreads = {name: spread(t) for name, t in zip(names, times)}
    result = {"latency_ms": {name: statistics.median(t) for name, t in zip(names, times)},
              "latency_ms_per_round": dict(zip(names, times)), "latency_spread": spreads,
              "speedup": None, "speedup_spread": None, "latency_noisy": is_noisy(spreads["model"])}
    if baseline is not None:
        pair = paired_summary(times[1], times[0])
        result.update(speedup=pair["speedup"], speedup_spread=pair["speedup_spread"],
                      speedup_per_round=pair["speedup_per_round"], latency_noisy=pair["noisy"])
    return {**result, "noise_rule": NOISE_RULE + (" (per-round speedups)" if baseline is not None else
                                                   " (per-round latencies)"),
            "rounds": len(times[0]), "seconds_per_round": BUDGET * seconds / rounds, "split": split, **setup}
