"""What every training loop of upop shares: the data order, random states, signals, logs.

- :func:`batch_indices`, :class:`StepBatches`, :func:`step_batches`: the batches of a step, a pure
  function of (seed, epoch, position, process), built in the process or by DataLoader workers;
- random states (:func:`seed_everything`, saved and restored with a run's state), host memory;
- :class:`RunStopped` and the signal handling that stops a loop at a step boundary (and any
  other phase at once); :class:`DiskFullError` for a full disk while writing;
- the log: the ``upop`` logger (:data:`logger`; silent unless the application configures logging,
  the CLI prints it), ``log.jsonl`` records of devices and phases, their copy to an experiment
  tracker (:class:`Tracking`, ``report_to``), the progress lines of a run without bars
  (:class:`ProgressLog`), and the evaluation autocast;
- what data parallelism needs: parameters that get no gradient (:func:`graph_parameters`, DDP's
  error mapped to names by :func:`ddp_unused`) and a training split every process gets items of.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from upop.config import UPopConfig
from upop.errors import UPopError
from upop.pruning.prune import PruningPlan
from upop.tasks._shard import evaluation_workers

STATE_FILE = "run.pt"

logger = logging.getLogger("upop")
"""The logger every message of a run goes to (the phases, resumes, progress lines). A library stays
silent unless its application configures logging, hence the NullHandler; ``upop`` (the CLI) adds a
handler that prints the messages to stdout."""
logger.addHandler(logging.NullHandler())

TRACKING_DIR = "tracking"
"""Under a run folder: the experiment tracker's files (``report_to``)."""


class TrainingError(UPopError):
    """The run cannot go on (non-finite loss or mask gradient); the last checkpoint is intact."""


def tf32_enabled() -> bool:
    """Whether fp32 matmuls may use TF32 on CUDA, read through torch's current API
    (``fp32_precision``; reading the legacy ``allow_tf32`` raises once anything in the process,
    e.g. a transformers Trainer, set the new one)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        return matmul.fp32_precision == "tf32"
    return bool(matmul.allow_tf32)  # torch before the new API


def set_tf32(on: bool) -> tuple:
    """TF32 for fp32 matmuls and convolutions on (``"tf32"``) or off (``"ieee"``), through the
    API the process already uses; returns what was set before, for :func:`restore_tf32`."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision"):
        before = ("new", matmul.fp32_precision, conv.conv.fp32_precision)
        matmul.fp32_precision = conv.conv.fp32_precision = "tf32" if on else "ieee"
        return before
    before = ("legacy", matmul.allow_tf32, conv.allow_tf32)
    matmul.allow_tf32 = conv.allow_tf32 = on
    return before


def restore_tf32(before: tuple) -> None:
    api, matmul, conv = before
    if api == "new":
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = matmul, conv
    else:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, conv


PROCESS_GROUP_TIMEOUT_MINUTES = 30
"""How long a collective of a multi-process run waits for the slowest process before it fails (the
process group's timeout; NCCL's own default is 10 minutes). Long enough for what one process does
while the others wait (the main process's checkpoint and dense-model writes, the latency table and
the paired latency it times alone); short enough that a dead or hung process stops the run within
the hour instead of holding every GPU."""


def process_group_kwargs() -> dict:
    """The keywords of the process group's creation (Accelerate's ``InitProcessGroupKwargs``): the
    timeout :data:`PROCESS_GROUP_TIMEOUT_MINUTES`. Passed where the group is first made (``PartialState``
    in :func:`upop.api.compress`) and to the Accelerator (:func:`make_accelerator`, for a run made
    without ``compress``); whichever comes first creates the group."""
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    return InitProcessGroupKwargs(timeout=timedelta(minutes=PROCESS_GROUP_TIMEOUT_MINUTES)).to_kwargs()


def _process_group_handler():
    """:func:`process_group_kwargs` as the Accelerator's handler."""
    from accelerate.utils import InitProcessGroupKwargs

    return InitProcessGroupKwargs(**process_group_kwargs())


def make_accelerator(config: UPopConfig, tracking_dir: str | os.PathLike | None = None):
    """The run's Accelerator: its device is the one device of every phase of the run. With
    ``config.report_to`` a tracker, it logs to that tracker under ``tracking_dir`` (see :class:`Tracking`)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cuda = torch.cuda.is_available()
    if cuda:  # TF32 matmuls for fp32 on Ampere and newer (--tf32 false keeps exact fp32)
        set_tf32(config.tf32)
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[config.precision]
    # gradients live in DDP's all-reduce buckets: no second copy of every gradient
    ddp = DistributedDataParallelKwargs(gradient_as_bucket_view=True)
    tracking = {}
    if config.report_to != "none" and tracking_dir is not None:
        tracking = {"log_with": config.report_to, "project_dir": os.fspath(tracking_dir)}
    return Accelerator(mixed_precision=mixed, cpu=not cuda,
                       kwargs_handlers=[ddp, _process_group_handler()], **tracking)


def batch_indices(n: int, batch_size: int, seed: int, epoch: int, position: int, rank: int = 0, world: int = 1) -> list[int]:
    """Sample indices of batch ``position`` of ``epoch`` for process ``rank`` (a pure function).

    Process ``rank`` takes the ``rank``-th contiguous slice of the global batch, so the features
    gathered from all processes in rank order are the batch one process would see at
    ``batch_size * world`` (what the global-batch contrastive losses rely on)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    global_bs = batch_size * world
    chunk = perm[position * global_bs : (position + 1) * global_bs]
    return chunk[rank * batch_size:(rank + 1) * batch_size].tolist()


class StepBatches(torch.utils.data.Dataset):
    """Item ``i`` is the collated training batch of step ``start + i``: the samples of
    :func:`batch_indices` for that step's (epoch, position), collated after ``set_epoch(epoch)``.
    A pure function of the step, so DataLoader workers produce exactly the in-process batches."""

    def __init__(self, dataset, collate, *, batch_size: int, seed: int, start: int, stop: int, rank: int = 0,
                 world: int = 1):
        self.dataset, self.collate, self.batch_size, self.seed = dataset, collate, batch_size, seed
        self.start, self.stop, self.rank, self.world = start, stop, rank, world
        self.spe = steps_per_epoch(len(dataset), batch_size, world)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, i: int) -> dict:
        epoch, pos = divmod(self.start + i, self.spe)
        idx = batch_indices(len(self.dataset), self.batch_size, self.seed, epoch, pos, self.rank, self.world)
        if hasattr(self.collate, "set_epoch"):
            self.collate.set_epoch(epoch)
        return self.collate([self.dataset[j] for j in idx])


def step_batches(dataset, collate, *, batch_size: int, seed: int, start: int, stop: int, rank: int = 0,
                 world: int = 1, workers: int = 0) -> Iterator[dict]:
    """The training batches of steps ``start .. stop-1`` in order, built in this process
    (``workers=0``) or ahead of time by ``workers`` DataLoader processes."""
    steps = StepBatches(dataset, collate, batch_size=batch_size, seed=seed, start=start, stop=stop, rank=rank,
                        world=world)
    if workers == 0 or len(steps) == 0:
        return (steps[i] for i in range(len(steps)))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are forked after tokenizer use
    # the generator keeps the DataLoader from drawing its worker seed from the global RNG, so a
    # run with workers draws the same dropout masks as one without (and a resume stays identical)
    loader = torch.utils.data.DataLoader(steps, batch_size=None, shuffle=False, num_workers=workers,
                                         pin_memory=torch.cuda.is_available(), prefetch_factor=2,
                                         generator=torch.Generator().manual_seed(seed))
    return iter(loader)


def steps_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    """Full batches per epoch (the ragged tail is dropped, as contrastive losses need full batches)."""
    return max(1, n // (batch_size * world))


def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        # this process's GPU only (a run uses one per process): a state of every visible GPU could not
        # be restored where fewer are visible (resumed with CUDA_VISIBLE_DEVICES=0)
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if cuda and torch.cuda.is_available():
        # one state (this process's GPU); a state saved by an older upop holds every visible GPU's:
        # the one of this process's device index, where there is one
        index = torch.cuda.current_device()
        torch.cuda.set_rng_state(cuda[0] if len(cuda) == 1 else cuda[index] if index < len(cuda) else cuda[0])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


class RunStopped(KeyboardInterrupt):
    """The run was stopped by a signal (SIGTERM, SIGINT) after saving its state at a step
    boundary; the same command with ``--resume`` continues it. ``exit_code`` is 128 + signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class PhaseResult:
    plan: PruningPlan
    best_metrics: dict[str, float]
    history: list[dict]


def release_host_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so the
    retraining's peak memory does not sit on top of what the search's optimizer left in the heap.
    (Accelerate's ``free_memory`` empties the CUDA cache; this is the CPU side.)"""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) for process ``rank``: each process gets its
    own stream (``seed + rank``), so dropout differs across the shards of a batch and the same
    seed reproduces every process's draws."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)  # also seeds every CUDA device


def eval_autocast(device: torch.device | str, precision: str):
    """The autocast of evaluation: none for fp32, bf16 autocast on the device for bf16."""
    import contextlib

    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


@contextlib.contextmanager
def evaluating(model: nn.Module, device, precision: str, workers: int = 0):
    """Evaluate ``model`` (unwrapped from the training wrapper) at the evaluation precision: the
    mixed-precision forward Accelerate installed for training (autocast to bf16/fp16, outputs
    cast to fp32; it stays on the module :meth:`Accelerator.unwrap_model` returns) is swapped for
    the model's own while inside, then put back, and the evaluation autocast (:func:`eval_autocast`)
    applies. Without it, validation during retraining ran at the training precision while the
    dense and final evaluations ran in fp32. ``workers``: the run's DataLoader workers, which
    load the evaluation's batches where its task gives them a loader
    (:func:`upop.tasks._shard.evaluation_workers`)."""
    original = model.__dict__.get("_original_forward")
    wrapped = model.__dict__.get("forward")
    if original is not None and wrapped is not None:
        model.forward = original
    try:
        with eval_autocast(device, precision), evaluation_workers(workers):
            yield model
    finally:
        if original is not None and wrapped is not None:
            model.forward = wrapped


def append_log(out: Path, record: dict, is_main: bool) -> None:
    """Append ``record`` to ``out/log.jsonl`` (the main process writes, the others do nothing)."""
    if is_main:
        with disk_full_guard(out / "log.jsonl", out / "state"), open(out / "log.jsonl", "a") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")



def tracker_values(record: dict) -> dict[str, float]:
    """The numbers of a ``log.jsonl`` record as tracker scalars: every int or float value (not a
    flag, not ``step``) tagged ``phase/name``, or ``phase/of/name`` for a record about another
    phase (``phase_end`` of ``search``: ``phase_end/search/seconds``)."""
    prefix = "/".join(str(record[k]) for k in ("phase", "of") if k in record)
    return {f"{prefix}/{name}": float(value) for name, value in sorted(record.items())
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


class Tracking:
    """A run's numbers sent to the experiment tracker of ``report_to`` through ``accelerator``
    (built with ``log_with``, :func:`make_accelerator`): what :func:`tracker_values` takes of each
    ``log.jsonl`` record, at the record's step. The main process only; the tracker starts on the
    first record with a number (after the run took its folder: nothing is written before), with
    ``config`` (the run's settings) as its hyper-parameters. :meth:`close` finishes the trackers
    (not ``Accelerator.end_training``, which would also tear down the process group under
    ``compress``'s caller)."""

    def __init__(self, accelerator, project: str, config: dict[str, Any]):
        self.acc, self.project = accelerator, project
        self.config = {k: v for k, v in config.items() if isinstance(v, (str, int, float, bool))}
        self.active = bool(getattr(accelerator, "log_with", None)) and accelerator.is_main_process
        self.started = False

    def log(self, record: dict) -> None:
        values = tracker_values(record) if self.active else {}
        if not values:
            return
        if not self.started:
            self.acc.init_trackers(self.project, config=self.config)
            self.started = True
            logger.info(f"tracking the run with {', '.join(t.name for t in self.acc.trackers)} in "
                        f"{self.acc.logging_dir}")
        step = record.get("step")
        self.acc.log(values, step=step if isinstance(step, int) else None)

    def close(self) -> None:
        """Flush and close the trackers (the run's last numbers are on disk after it)."""
        if self.started:
            for tracker in self.acc.trackers:
                tracker.finish()
            self.acc.trackers = []
            self.started = False


class ProgressLog:
    """The progress of a loop without a bar (``--no-progress``): a line to :data:`logger` at the
    first step and then every ``every`` seconds (``clock``), with the phase, the step, what the
    loop shows beside its bar (loss, ...) and the time since the phase started, so a run without
    bars is never silent for minutes. It takes the calls the loops make on a tqdm bar."""

    def __init__(self, total: int, initial: int, desc: str, every: float, clock=time.monotonic):
        self.total, self.n, self.desc, self.every, self.clock = total, initial, desc, every, clock
        self.start = clock()
        self.last: float | None = None
        self.postfix: dict[str, Any] = {}

    def set_postfix(self, **values) -> None:
        self.postfix = values

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if self.last is None or now - self.last >= self.every:
            self.last = now
            logger.info(self.line(now))

    def line(self, now: float) -> str:
        """``search step 5/16, loss 2.3026, p_t 0.100, elapsed 0:01:02``."""
        seconds = int(now - self.start)
        parts = [f"{self.desc} step {self.n}/{self.total}", *(f"{k} {v}" for k, v in self.postfix.items()),
                 f"elapsed {seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"]
        return ", ".join(parts)

    def close(self) -> None:
        """Nothing to clear (tqdm's call at the end of a loop)."""

def device_record(phase: str, model: nn.Module, precision: str) -> dict:
    """The log record that says where and in which dtype ``phase`` runs (read by make gpu-check)."""
    p = next(model.parameters())
    return {"phase": "device", "of": phase, "device": str(p.device), "dtype": str(p.dtype), "precision": precision}


class PhaseClock:
    """Wall time and peak accelerator memory of one phase, for its ``phase_end`` log record."""

    def __init__(self, phase: str, device: torch.device):
        self.phase, self.device, self.steps = phase, torch.device(device), None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start = time.perf_counter()

    def record(self) -> dict:
        peak = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        return {"phase": "phase_end", "of": self.phase, "seconds": time.perf_counter() - self.start,
                "steps": self.steps, "peak_memory_mb": peak}


class StopSignals:
    """While active, SIGTERM and SIGINT ask the training loop to stop at the end of the current
    step (``requested``); outside a loop (``in_loop`` False) they stop at once, with a
    :class:`RunStopped` that says ``where`` the run was. The previous handlers are restored when
    the outermost ``with`` exits (the object is re-entrant: the run's phases and the final
    evaluation after them share one). Only the main thread can install handlers: elsewhere this
    is a no-op and signals keep their default behaviour."""

    def __init__(self):
        self.requested: int | None = None
        self.in_loop = False
        #: what the run is doing, for the message of a stop outside the loop ("during ...")
        self.where = ""
        self._previous: dict[int, Any] = {}
        self._depth = 0

    def _handle(self, signum, frame) -> None:
        if self.in_loop and self.requested is None:
            self.requested = signum
            return
        raise self.stopped(signum)

    def stopped(self, signum: int) -> "RunStopped":
        """The :class:`RunStopped` of ``signum`` outside a loop (``where`` the run was)."""
        name = signal.Signals(signum).name
        stopped = RunStopped(f"stopped by {name}" + (f" {self.where}" if self.where else ""), 128 + int(signum))
        stopped.shared = True  # a launcher signals every process: the main process says so
        return stopped

    @contextmanager
    def deferred(self):
        """A stretch that must not be cut (a write and its bookkeeping): a signal inside it is only
        recorded in ``requested``, as in the loop; the caller decides what to do after it."""
        was = self.in_loop
        self.in_loop = True
        try:
            yield self
        finally:
            self.in_loop = was

    def __enter__(self):
        import threading

        self._depth += 1
        if self._depth == 1 and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth:
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class DiskFullError(TrainingError):
    """The disk filled up while the run wrote a file: the write was dropped whole (atomic
    writes), so the last good checkpoint is intact and ``--resume`` continues once there is room."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a full disk: ``ENOSPC``, or the quota's ``EDQUOT``."""
    import errno

    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


@contextmanager
def disk_full_guard(path: str | os.PathLike, checkpoint: str | os.PathLike, what: str = ""):
    """Turn a full disk (``ENOSPC``, or the quota's ``EDQUOT``) while writing ``path`` (described
    as ``what`` if given) into one line that names it and where the last good checkpoint is
    (``checkpoint``). Why here and not at the writer: ``torch.save`` into a file object raises
    ``OSError(ENOSPC)`` with no file name, so only the caller knows which file it was."""
    from upop.errors import show

    try:
        yield
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        error = DiskFullError(f"no space left on device while writing {what or show(os.fspath(path))}; the last good "
                              f"checkpoint is kept in {show(os.fspath(checkpoint))}: free some space and run the "
                              "same command with --resume")
        error.located = True
        raise error from None


def graph_parameters(loss: torch.Tensor) -> set[int]:
    """``id`` of every leaf tensor (parameter) that backpropagating ``loss`` would reach: a walk
    over its autograd graph, the same walk DDP's ``find_unused_parameters`` does every step."""
    found: set[int] = set()
    seen: set = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: the leaf it fills
        if variable is not None:
            found.add(id(variable))
        stack.extend(child for child, _ in node.next_functions)
    return found


def reducer_names(model: nn.Module) -> list[str]:
    """The names of ``model``'s parameters in the order DDP's reducer numbers them (module
    order, trainable only, a shared parameter once): what its error's "indices" refer to."""
    seen: set[int] = set()
    names = []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            names.append(name)
    return names


_DDP_UNFINISHED = "Expected to have finished reduction in the prior iteration"


def ddp_unused(exc: BaseException, names: list[str] | None = None) -> list[str] | None:
    """The parameters DDP says got no gradient, if ``exc`` is its "unfinished reduction" error
    (names from ``TORCH_DISTRIBUTED_DEBUG``, or its indices mapped through ``names``; the indices
    as text where no names are known); None for any other exception."""
    import re

    text = str(exc)
    if _DDP_UNFINISHED not in text:
        return None
    named = re.search(r"Parameters which did not receive grad for rank \d+: ([^\n]+)", text)
    if named:
        return [n.strip() for n in named.group(1).split(",") if n.strip()]
    indices = re.search(r"Parameter indices which did not receive grad for rank \d+: ([\d ]+)", text)
    if not indices:
        return []
    numbers = [int(i) for i in indices.group(1).split()]
    return [names[i] if names is not None and i < len(names) else f"#{i}" for i in numbers]


def check_shards(n: int, batch_size: int, world: int, split: str = "training") -> None:
    """Refuse a ``split`` of ``n`` items that leaves a process without an item in a step: below
    one global batch every step is ``perm[:n]``, cut in ``world`` slices of ``batch_size``, so the
    last process gets nothing when ``n <= batch_size * (world - 1)`` (an empty batch breaks the
    collators and the gathered losses)."""
    from upop.errors import DataError

    if world > 1 and n <= batch_size * (world - 1):
        error = DataError(f"the {split} split has {n} item{'s' if n != 1 else ''}: too few for {world} processes "
                          f"at --batch-size {batch_size} (process {world - 1} would get no item; need more than "
                          f"{batch_size * (world - 1)}, best {batch_size * world}: a full batch per process); use "
                          "more data, a smaller --batch-size or fewer processes")
        error.shared = True  # every process finds it: the main process says so
        raise error


def loss_scale(accelerator) -> tuple[Any, bool]:
    """The fp16 loss scale the gradients carry and whether a scaler is in use: the scaler's scale
    tensor where it has one (used on the device, never read: ``get_scale()`` would wait for the
    device every step), else its value."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None or (hasattr(scaler, "is_enabled") and not scaler.is_enabled()):
        return 1.0, False
    get_async = getattr(scaler, "_get_scale_async", None)
    scale = get_async() if callable(get_async) else None
    return (scale if scale is not None else scaler.get_scale()), True
