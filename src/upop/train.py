"""The training loop of a UPop run: search -> prune -> retrain, resumable at any step.

One :class:`Run` drives the phases on Accelerate (devices, mixed precision, multi-process):

- **search** (METHOD §2): weights train with a constant learning rate; mask gradients are
  accumulated and the masks re-selected and projected every ``interval`` steps;
- **prune** (METHOD §3): the units whose mask is 0 are sliced out;
- **retrain**: fresh AdamW, cosine schedule; the best checkpoint on validation is kept.

Every ``checkpoint_every`` steps, and at each phase boundary, the run writes ``state/run.pt``
atomically (temp file + rename): weights, optimizer, scheduler, masks and accumulated scores,
search state, RNG states and the data position. ``resume=True`` continues from it. The data
order is a pure function of (seed, epoch), so a resumed run sees the same batches.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from .arch import find_groups
from .checkpoint import load_compressed, save_compressed
from .config import UPopConfig
from .errors import ConfigError, DataError, UPopError
from .masks import attach_masks
from .prune import PruningPlan, apply_plan, prune
from .resume import read_state
from .rundir import torch_save_atomic
from .search import UPopSearch, resolve_round_to
from .tasks import Task

STATE_FILE = "run.pt"


class TrainingError(UPopError):
    """The run cannot go on (non-finite loss or mask gradient); the last checkpoint is intact."""


def _accelerator(config: UPopConfig):
    """The run's Accelerator: its device is the one device of every phase of the run."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cuda = torch.cuda.is_available()
    if cuda:  # TF32 matmuls for fp32 on Ampere and newer (--tf32 false keeps exact fp32)
        torch.backends.cuda.matmul.allow_tf32 = config.tf32
        torch.backends.cudnn.allow_tf32 = config.tf32
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[config.precision]
    # gradients live in DDP's all-reduce buckets: no second copy of every gradient
    ddp = DistributedDataParallelKwargs(gradient_as_bucket_view=True)
    return Accelerator(mixed_precision=mixed, cpu=not cuda, kwargs_handlers=[ddp])


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


def _rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
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


def append_log(out: Path, record: dict, is_main: bool) -> None:
    """Append ``record`` to ``out/log.jsonl`` (the main process writes, the others do nothing)."""
    if is_main:
        with open(out / "log.jsonl", "a") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")


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


class _Signals:
    """While active, SIGTERM and SIGINT ask the training loop to stop at the end of the current
    step (``requested``); outside a loop (``in_loop`` False) they stop at once. The previous
    handlers are restored on exit. Only the main thread can install handlers: elsewhere this is
    a no-op and signals keep their default behaviour."""

    def __init__(self):
        self.requested: int | None = None
        self.in_loop = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.in_loop and self.requested is None:
            self.requested = signum
            return
        name = signal.Signals(signum).name
        raise RunStopped(f"stopped by {name}", 128 + signum)

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class Run:
    """One search -> prune -> retrain run writing into ``out_dir``.

    ``model`` must be the dense model, as loaded from ``base_model`` (also on resume: the run
    rebuilds the pruned model from it and the saved plan). ``fingerprint`` (see
    :mod:`upop.resume`) is stored with every state and a resumed state must carry the same.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        train,
        val,
        config: UPopConfig,
        processor,
        out_dir: str | os.PathLike,
        resume: bool = False,
        base_model: str = "",
        log: Callable[[str], None] = print,
        progress: bool = True,
        stop_after: int | None = None,
        fingerprint: dict | None = None,
    ):
        self.model, self.task, self.train_set, self.val_set = model, task, train, val
        self.config, self.processor = config, processor
        self.out = Path(out_dir)
        self.state_dir = self.out / "state"
        self.resume, self.base_model, self.log, self.progress = resume, base_model, log, progress
        self.stop_after = stop_after  # testing hook: stop (as if killed) after this many total steps
        self.fingerprint = fingerprint or {}
        self.acc = _accelerator(config)
        self.collate = task.collator(processor, seed=config.seed)
        self.spe = steps_per_epoch(len(train), config.batch_size, self.acc.num_processes)
        self.search_steps = config.search_epochs * self.spe
        self.retrain_steps = config.retrain_epochs * self.spe
        self.interval = config.resolved_interval(self.search_steps)
        if config.method == "upop" and self.interval >= self.search_steps:
            raise ConfigError(
                f"the search has {self.search_steps} steps ({config.search_epochs} epochs of {self.spe}: "
                f"{len(train)} samples / ({config.batch_size} x {self.acc.num_processes} processes)) and interval="
                f"{self.interval}: a progressive search needs more steps than its interval; use more data or "
                "--search-epochs, a smaller --batch-size or --interval, or --method one-shot")
        # the width multiple (round_to "auto" depends on the device and the narrowest group)
        self.round_to, self.round_to_why = resolve_round_to(
            config.round_to, find_groups(model, granularity=config.granularity), self.acc.device.type, config.allocation)
        self._steps_done = 0
        self.signals = _Signals()
        self.teacher, self.distiller = self._teacher(model)
        #: what the run distils, for the report (the distiller is released when the run ends)
        self.distill_info = self.distiller.describe() if self.distiller is not None else {"mode": "none"}

    def _teacher(self, model: nn.Module):
        """The frozen dense teacher (a copy of ``model`` taken before any mask or pruning, on the
        run's device) when the run distils or the task learns from it, and the distiller."""
        from .distill import Distiller, make_teacher

        cfg = self.config
        if cfg.distill == "none" and not getattr(self.task, "needs_teacher", False):
            return None, None
        dtype = torch.bfloat16 if cfg.teacher_precision == "bf16" else None
        teacher = make_teacher(model, device=self.acc.device, dtype=dtype)
        if getattr(self.task, "needs_teacher", False):
            self.task.set_teacher(teacher)
        if cfg.distill == "none":
            return teacher, None
        return teacher, Distiller(teacher, cfg.distill, cfg.distill_weight, cfg.distill_temperature,
                                  autocast_bf16=dtype is not None)

    def _task_loss(self, wrapped: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(task loss, distillation term or None)`` of ``batch``."""
        if self.distiller is None:
            return self.task.loss(wrapped, batch), None
        return self.distiller.loss(self.task.loss, wrapped, self.acc.unwrap_model(wrapped), batch)

    # helpers ---------------------------------------------------------------------------------
    def _batches(self, start: int, stop: int) -> Iterator[dict[str, torch.Tensor]]:
        """This process's training batches of steps ``start .. stop-1``, on the device."""
        for batch in step_batches(self.train_set, self.collate, batch_size=self.config.batch_size,
                                  seed=self.config.seed, start=start, stop=stop, rank=self.acc.process_index,
                                  world=self.acc.num_processes,
                                  workers=self.config.resolved_workers(self.acc.num_processes)):
            yield {k: v.to(self.acc.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _log(self, record: dict) -> None:
        append_log(self.out, record, self.acc.is_main_process)

    def _save_state(self, state: dict) -> None:
        """Write ``state/run.pt`` atomically (main process), with every process's RNG state."""
        from accelerate.utils import gather_object

        rng = gather_object([_rng_state()]) if self.acc.num_processes > 1 else [_rng_state()]
        if self.acc.is_main_process:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            state["rng"] = rng
            state["fingerprint"] = self.fingerprint
            state["totals"] = {"search": self.search_steps, "retrain": self.retrain_steps}
            torch_save_atomic(state, self.state_dir / STATE_FILE)
        self.acc.wait_for_everyone()

    def load_state(self) -> dict | None:
        """The saved run state (checked: see :func:`upop.resume.read_state`), or None."""
        return read_state(self.state_dir / STATE_FILE, self.fingerprint,
                          {"search": self.search_steps, "retrain": self.retrain_steps})

    def _restore_rng(self, state: dict) -> None:
        rng = state["rng"]
        _set_rng_state(rng[self.acc.process_index] if isinstance(rng, list) else rng)

    def _scaler_state(self) -> dict | None:
        scaler = getattr(self.acc, "scaler", None)
        return scaler.state_dict() if scaler is not None else None

    def _load_scaler(self, state: dict) -> None:
        scaler = getattr(self.acc, "scaler", None)
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])

    def _identical(self, tensors) -> bool:
        """True if every process holds exactly the same values in ``tensors``: a position-weighted
        float64 digest is computed on the device, one tensor at a time (no copy of the model),
        and the two numbers of each process are compared."""
        digest = torch.zeros(2, dtype=torch.float64, device=self.acc.device)
        offset = 0
        for t in tensors:
            flat = t.detach().reshape(-1).to(torch.float64)
            weights = torch.arange(offset + 1, offset + 1 + flat.numel(), dtype=torch.float64, device=flat.device)
            digest[0] += flat @ weights
            digest[1] += flat.sum()
            offset += flat.numel()
        gathered = self.acc.gather(digest.unsqueeze(0))
        return bool((gathered == gathered[0]).all())

    def _check_same_weights(self, model: nn.Module, phase: str, step: int) -> None:
        """Every process must hold the same weights (data parallelism averages the gradients); a
        task whose loss bypasses the wrapped model's forward would let them drift apart."""
        if self.acc.num_processes == 1:
            return
        identical = self._identical(p for p in model.parameters())
        self._log({"phase": "sync", "after": phase, "step": step, "processes": self.acc.num_processes,
                   "weights_identical": identical})
        if not identical:
            raise TrainingError(f"the {self.acc.num_processes} processes hold different weights after {phase} step "
                                f"{step}: task {self.task.name!r} does not synchronise its gradients; this is a bug, "
                                "please report it")

    def _check_same_plan(self, plan: PruningPlan) -> None:
        """Every process must have chosen the same plan (masks are kept identical by averaging
        the mask gradients); a mismatch stops the run instead of saving a wrong model."""
        if self.acc.num_processes == 1:
            return
        from accelerate.utils import gather_object

        mine = json.dumps({k: v.kept for k, v in sorted(plan.groups.items())})
        plans = gather_object([mine])
        identical = all(p == plans[0] for p in plans)
        self._log({"phase": "prune", "processes": self.acc.num_processes, "plans_identical": identical})
        if not identical:
            raise TrainingError(f"the {self.acc.num_processes} processes chose different plans; this is a bug, please report it")

    def _tick(self) -> None:
        self._steps_done += 1
        if self.stop_after is not None and self._steps_done >= self.stop_after:
            raise KeyboardInterrupt(f"stopped after {self._steps_done} steps (stop_after)")

    def _where(self, phase: str, step: int, rank: int | None = None) -> str:
        """``"search step 3"``, naming the process (this one by default) when there are several."""
        rank = self.acc.process_index if rank is None else rank
        return f"{phase} step {step}" + (f" on process {rank} of {self.acc.num_processes}"
                                         if self.acc.num_processes > 1 else "")

    def _failure(self, exc: BaseException, phase: str, step: int) -> BaseException:
        """``exc`` raised at a step, as the user should see it: a user error keeps its type and
        says where it happened and how to continue; anything else (a bug) is left as it is."""
        if isinstance(exc, UPopError) and not isinstance(exc, TrainingError) and not getattr(exc, "located", False):
            message = str(exc).strip()
            if "\n" in message:  # re-raised from a DataLoader worker: the original message is the last line
                message = message.splitlines()[-1].split(": ", 1)[-1]
            error = type(exc)(f"{message} (at {self._where(phase, step)}); the run is saved in {self.out}: once "
                              "fixed, run the same command with --resume")
            error.located = True
            return error
        return exc

    def _forward(self, compute: Callable[[], tuple[torch.Tensor, torch.Tensor]], phase: str, step: int):
        """Run one step's forward and agree with the other processes on how it went.

        ``compute()`` returns ``(loss to backpropagate, task loss to log)``. An exception in it is
        raised at once, on this process only: the others may be inside a collective of the
        forward, so this process must not enter another one; it leaves (the CLI exits at once)
        and the launcher stops the others. Otherwise every process all-reduces (task loss,
        non-finite count, stop requests) in ONE collective: a non-finite loss on any process
        stops every process at this step, before backward, with one line naming the step (the
        last checkpoint stays as it was); a stop request (SIGTERM / SIGINT) on any process makes
        every process finish this step and stop after it.
        Returns (loss, mean task loss over processes, stop requested).
        """
        try:
            with self.acc.autocast():
                loss, task_loss = compute()
        except Exception as exc:
            raise self._failure(exc, phase, step) from None
        value = task_loss.detach().float().reshape(())
        finite = torch.isfinite(value) & torch.isfinite(loss.detach().float().reshape(()))
        stats = torch.stack([torch.where(finite, value, torch.zeros_like(value)), (~finite).float(),
                             torch.tensor(float(self.signals.requested is not None), device=value.device)])
        if self.acc.num_processes > 1:
            stats = self.acc.reduce(stats, reduction="sum")
        loss_sum, nonfinite, stop = stats.tolist()
        if nonfinite:
            self._stop_nonfinite(loss, task_loss, phase, step)
        return loss, loss_sum / self.acc.num_processes, bool(stop)

    def _stop_nonfinite(self, loss: torch.Tensor, task_loss: torch.Tensor, phase: str, step: int) -> None:
        """Every process raises the same one-line error naming the first process whose loss (the
        task loss, or the total with the sparsity term) is not finite."""
        from accelerate.utils import gather_object

        bad = [float(t.detach()) for t in (task_loss, loss) if not torch.isfinite(t.detach()).all()]
        mine = bad[0] if bad else None
        values = gather_object([mine]) if self.acc.num_processes > 1 else [mine]
        rank, value = next((r, v) for r, v in enumerate(values) if v is not None)
        where = self._where(phase, step, rank)
        hint = "lower --lr" + (" or use --precision fp32" if self.config.precision != "fp32" else "")
        error = TrainingError(f"non-finite loss ({value}) at {where}; the last good checkpoint is in {self.state_dir}; "
                              f"{hint}")
        error.shared = True
        raise error

    def _after_step(self, stop: bool, phase: str, done: int, total: int, save: Callable[[], None]) -> None:
        """At a step boundary: on a stop request, save the state and raise :class:`RunStopped`."""
        if not stop or done >= total:
            return
        save()
        signum = self.signals.requested or signal.SIGTERM
        name = signal.Signals(signum).name if self.signals.requested else "a stop request on another process"
        stopped = RunStopped(f"stopped by {name} after {phase} step {done}/{total}; the run is saved in {self.out}",
                             128 + int(signum))
        stopped.shared = True  # every process stops at this step: the main process says so
        raise stopped

    def _bar(self, total: int, initial: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, disable=not (self.progress and self.acc.is_main_process),
                    dynamic_ncols=True, leave=False)

    # phases ----------------------------------------------------------------------------------
    def run(self) -> PhaseResult:
        """Run (or resume) every phase; returns the plan and the best validation metrics. The
        distillation teacher and its hooks are released at the end (a task that learns from the
        teacher keeps its own reference for the final evaluation)."""
        try:
            return self._run()
        finally:
            if self.distiller is not None:
                self.distiller.close()
            self.teacher = self.distiller = None

    def _run(self) -> PhaseResult:
        with self.signals:
            state = self.load_state() if self.resume else None
            if self.resume and state is None:
                self.log("resuming: the run had no checkpoint yet, the search starts at step 0")
            if state is not None and state["phase"] == "done":
                self.model = load_compressed(self.out / "compressed", device=self.acc.device)
                return PhaseResult(PruningPlan.from_dict(state["plan"]), state["best_metrics"], state["history"])
            if state is None or state["phase"] == "search":
                plan = self._search(state)
                state = None
            else:
                plan = PruningPlan.from_dict(state["plan"])
            return self._retrain(plan, state)

    def _loop(self, phase: str, start: int, total: int, body: Callable[[int, dict], None]) -> None:
        """Steps ``start .. total-1`` of ``phase`` with a progress bar that is closed (cleared)
        before anything else is printed, also when a step raises."""
        bar = self._bar(total, start, phase)
        self.bar = bar
        self.signals.in_loop = True
        step = start
        try:
            for step, batch in zip(range(start, total), self._batches(start, total)):
                body(step, batch)
                bar.update(1)
        except DataError as exc:  # a file that changed on disk after the check, found by the reader
            raise self._failure(exc, phase, step) from None
        finally:
            self.signals.in_loop = False
            bar.close()

    def _latency_costs(self, model: nn.Module, groups) -> dict[str, float]:
        """Milliseconds per unit of every group (``cost="latency"``), measured on the main process
        on the run's device, latency batch and evaluation dtype, or read from the run's cache."""
        from .latency_table import TABLE_FILE, load_or_measure

        box = [None]
        if self.acc.is_main_process:
            dtype = torch.bfloat16 if self.config.eval_precision == "bf16" else torch.float32
            table, reused = load_or_measure(self.state_dir / TABLE_FILE, model, groups, self.config.latency_batch_size,
                                            self.acc.device, dtype, self.round_to)
            self._log({"phase": "latency-table", "reused": reused, "per_unit_ms": table["per_unit_ms"]})
            box = [table["per_unit_ms"]]
        if self.acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(box)
        return box[0]

    def _search(self, state: dict | None) -> PruningPlan:
        cfg, model = self.config, self.model
        # text length of this data sets the FLOPs cost of text units (vision: from the config)
        groups = find_groups(model, text_tokens=self.task.text_tokens(self.processor, self.train_set),
                             granularity=cfg.granularity)
        model.to(self.acc.device)
        masks = attach_masks(model, groups)
        search = UPopSearch(masks, cfg.ratio, self.search_steps, self.interval, cfg.cost, cfg.method, cfg.w_attn, cfg.w_mlp,
                            round_to=self.round_to, allocation=cfg.allocation, score=cfg.score,
                            unit_costs=self._latency_costs(model, groups) if cfg.cost == "latency" else None)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        start = 0
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            search.load_state_dict(state["search"])
            start = state["step"]
            self.log(f"resuming the search at step {start}/{self.search_steps}")
        else:
            seed_everything(cfg.seed, self.acc.process_index)
        wrapped, optimizer = self.acc.prepare(model, optimizer)
        masks.to(self.acc.device)
        if state is not None:
            self._load_scaler(state)
            self._restore_rng(state)
        wrapped.train()
        self._log({**device_record("search", model, cfg.precision), "round_to": self.round_to,
                   "round_to_why": self.round_to_why})
        clock = PhaseClock("search", self.acc.device)

        def save(done: int) -> None:
            try:
                search_state = search.state_dict()
            except FloatingPointError as exc:  # a non-finite mask gradient since the last update
                raise TrainingError(f"{exc}; the last good checkpoint is in {self.state_dir}") from None
            self._save_state({"phase": "search", "step": done, "model": self.acc.unwrap_model(wrapped).state_dict(),
                              "optimizer": optimizer.state_dict(), "search": search_state,
                              "scaler": self._scaler_state()})

        def step_fn(step: int, batch: dict) -> None:
            def compute():
                task_loss, kd = self._task_loss(wrapped, batch)
                loss = task_loss + search.sparsity_loss()
                return (loss if kd is None else loss + kd), task_loss

            loss, task_loss, stop = self._forward(compute, "search", step)
            self.acc.backward(loss)
            scaler = getattr(self.acc, "scaler", None)
            try:
                update = search.step(step, grad_scale=scaler.get_scale() if scaler is not None else 1.0,
                                     skip_nonfinite=scaler is not None)
            except FloatingPointError as exc:
                raise TrainingError(f"{exc}; the last good checkpoint is in {self.state_dir}") from None
            if cfg.max_grad_norm:
                self.acc.clip_grad_norm_(wrapped.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            p_t = update.ratio if update else (search.history[-1].ratio if search.history else 0.0)
            self.bar.set_postfix(loss=f"{task_loss:.4f}", p_t=f"{p_t:.3f}")
            record = {"phase": "search", "step": step, "loss": task_loss, "p_t": p_t}
            if update:
                record["removed"] = update.removed
                if self.acc.num_processes > 1:
                    record["masks_identical"] = self._identical(m for _, m in masks.items())
            self._log(record)
            done = step + 1
            if done % cfg.checkpoint_every == 0 and done < self.search_steps:
                save(done)
            self._after_step(stop, "search", done, self.search_steps, lambda: save(done))
            self._tick()

        self._loop("search", start, self.search_steps, step_fn)
        clock.steps = self.search_steps - start
        self._log(clock.record())
        model = self.acc.unwrap_model(wrapped)
        # the search's optimizer (2x the weights in fp32) and Accelerate's references to it and
        # to the wrapper are released before retraining builds its own
        wrapped = optimizer = None  # noqa: F841 (dropped references)
        self.acc.free_memory()
        settings = {**search.settings(), "search_epochs": cfg.search_epochs, "seed": cfg.seed, "task": self.task.name}
        self._check_same_weights(model, "search", self.search_steps)
        plan = prune(model, masks, base_model=self.base_model, search=settings)
        if search.unit_costs is not None:  # the share of the measured latency removed
            costs = search.unit_costs
            total = sum(costs[name] * gp.dense_units for name, gp in plan.groups.items())
            plan.achieved_ratio["latency"] = sum(costs[name] * (gp.dense_units - len(gp.kept))
                                                 for name, gp in plan.groups.items()) / total
        self._check_same_plan(plan)
        release_host_memory()  # the search's optimizer and the sliced-away weights
        self.model = model
        self.log(f"pruned: removed {plan.achieved_ratio['params']:.1%} of prunable params, "
                 f"{plan.achieved_ratio['flops']:.1%} of prunable FLOPs")
        self._save_state({"phase": "retrain", "step": 0, "plan": plan.to_dict(), "model": model.state_dict(),
                          "best": None, "best_metrics": {}, "history": []})
        self._tick()  # pruning counts as one step for stop_after
        return plan

    def _retrain(self, plan: PruningPlan, state: dict | None) -> PhaseResult:
        cfg = self.config
        model = self.model
        if state is not None:  # rebuild the pruned shape from the dense model, then load
            if getattr(model, "upop_plan", None) is None:
                apply_plan(model, plan)
            model.load_state_dict(state["model"])
        model.to(self.acc.device)
        lr = cfg.retrain_lr or cfg.lr
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
        total = max(1, self.retrain_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        start, best, best_metrics, history = 0, None, {}, []
        if state is not None:
            start = state["step"]
            best, best_metrics, history = state["best"], state["best_metrics"], state["history"]
            if "optimizer" in state:
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
            if start:
                self.log(f"resuming the retraining at step {start}/{self.retrain_steps}")
        compressed_dir = self.out / "compressed"
        wrapped, optimizer = self.acc.prepare(model, optimizer)
        if state is not None:
            self._load_scaler(state)
            self._restore_rng(state)
        wrapped.train()
        self._log(device_record("retrain", model, cfg.precision))
        clock = PhaseClock("retrain", self.acc.device)

        def save(done: int) -> None:
            self._save_state({"phase": "retrain", "step": done, "plan": plan.to_dict(),
                              "model": self.acc.unwrap_model(wrapped).state_dict(),
                              "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                              "scaler": self._scaler_state(),
                              "best": best, "best_metrics": best_metrics, "history": history})

        def step_fn(step: int, batch: dict) -> None:
            nonlocal best, best_metrics
            def compute():
                task_loss, kd = self._task_loss(wrapped, batch)
                return (task_loss if kd is None else task_loss + kd), task_loss

            loss, task_loss, stop = self._forward(compute, "retrain", step)
            self.acc.backward(loss)
            if cfg.max_grad_norm:
                self.acc.clip_grad_norm_(wrapped.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            self.bar.set_postfix(loss=f"{task_loss:.4f}")
            self._log({"phase": "retrain", "step": step, "loss": task_loss, "lr": scheduler.get_last_lr()[0]})
            done = step + 1
            if done % self.spe == 0 or done == self.retrain_steps:
                self._check_same_weights(self.acc.unwrap_model(wrapped), "retrain", done)
                with eval_autocast(self.acc.device, cfg.eval_precision):
                    metrics = self.task.evaluate(self.acc.unwrap_model(wrapped), self.val_set, self.processor,
                                                 cfg.eval_batch_size, accelerator=self.acc)
                value = metrics[self.task.main_metric]
                history.append({"step": done, **metrics})
                self._log({"phase": "val", "step": done, **metrics})
                if best is None or value > best:
                    best, best_metrics = value, metrics
                    if self.acc.is_main_process:
                        save_compressed(self.acc.unwrap_model(wrapped), compressed_dir, processor=self.processor, plan=plan)
            if done % cfg.checkpoint_every == 0 or done % self.spe == 0:
                save(done)
            self._after_step(stop, "retrain", done, self.retrain_steps, lambda: save(done))
            self._tick()

        self._loop("retrain", start, self.retrain_steps, step_fn)
        clock.steps = self.retrain_steps - start
        self._log(clock.record())
        model = self.acc.unwrap_model(wrapped)
        wrapped = optimizer = scheduler = None  # noqa: F841 (dropped references)
        self.acc.free_memory()
        if self.retrain_steps == 0 or not (compressed_dir / "upop_plan.json").is_file():
            with eval_autocast(self.acc.device, cfg.eval_precision):
                best_metrics = self.task.evaluate(model, self.val_set, self.processor, cfg.eval_batch_size,
                                                  accelerator=self.acc)
            if self.acc.is_main_process:
                save_compressed(model, compressed_dir, processor=self.processor, plan=plan)
        self._save_state({"phase": "done", "step": self.retrain_steps, "plan": plan.to_dict(), "model": {},
                          "best": best, "best_metrics": best_metrics, "history": history})
        self.model = model
        return PhaseResult(plan=plan, best_metrics=best_metrics, history=history)


__all__ = ["Run", "RunStopped", "TrainingError", "batch_indices", "finetune", "seed_everything",
           "steps_per_epoch"]


def finetune(
    model: nn.Module, task: Task, train, val, processor, *, epochs: int, lr: float, batch_size: int,
    seed: int = 0, weight_decay: float = 0.05, warmup_steps: int = 0, log: Callable[[str], None] = print,
    progress: bool = True, workers: int = 0,
) -> tuple[nn.Module, dict[str, float]]:
    """Plain training of ``model`` on ``task`` (AdamW, warm-up then cosine), keeping the best
    weights on validation. Used to train the demo model and as the baseline in benchmarks."""
    from tqdm.auto import tqdm

    collate = task.collator(processor, seed=seed)
    spe = steps_per_epoch(len(train), batch_size)
    total = epochs * spe
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def schedule(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (s - warmup_steps) / max(1, total - warmup_steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    torch.manual_seed(seed)
    best, best_state, best_metrics = None, None, {}
    bar = tqdm(total=total, desc="train", disable=not progress, dynamic_ncols=True)
    for step, batch in enumerate(step_batches(train, collate, batch_size=batch_size, seed=seed, start=0, stop=total,
                                              workers=workers)):
        epoch = step // spe
        model.train()
        loss = task.loss(model, batch)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.update(1)
        if (step + 1) % spe == 0:
            metrics = task.evaluate(model, val, processor)
            log(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.4f} " + " ".join(f"{k} {v:.1f}" for k, v in metrics.items()))
            if best is None or metrics[task.main_metric] > best:
                best, best_metrics = metrics[task.main_metric], metrics
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval(), best_metrics
