"""A UPop run: search -> prune -> retrain, resumable at any step.

One :class:`Run` drives the phases (:mod:`upop.engine.phases`, on the one step loop of :mod:`upop.engine.loop`)
on Accelerate (devices, mixed precision, multi-process):

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
import os
import signal
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from upop.arch import find_groups
from upop.checkpoint.folder import load_compressed
from upop.config import ResolvedSettings, UPopConfig
from upop.errors import DataError, UPopError
from upop.engine.loop import Pending, finetune
from upop.engine.phases import check_gradient_checkpointing, retrain_phase, search_phase, searched_groups
from upop.measure.memory import check_fits, weights_precision
from upop.pruning.prune import PruningPlan
from upop.engine.resume import read_state
from upop.measure.host_sync import DeviceBatch
from upop.engine.runtime import (STATE_FILE, TRACKING_DIR, PhaseResult, ProgressLog, RunStopped, StopSignals, Tracking,
                      TrainingError, append_log, batch_indices, check_shards, ddp_unused, disk_full_guard,
                      graph_parameters, logger, make_accelerator, reducer_names, rng_state, seed_everything,
                      set_rng_state, step_batches, steps_per_epoch)
from upop.runs.rundir import torch_save_atomic
from upop.search.mask_search import check_reachable, resolve_round_to
from upop.tasks import Task
from upop.tasks.registry import caches_teacher


class Run:
    """One search -> prune -> retrain run writing into ``out_dir``.

    ``model`` must be the dense model, as loaded from ``base_model`` (also on resume: the run
    rebuilds the pruned model from it and the saved plan). ``settings`` are the run's resolved
    settings (:meth:`upop.UPopConfig.resolve`, made once by :func:`upop.compress`); a
    :class:`~upop.UPopConfig` given instead is resolved here, for the run's device, processes and
    length. The run decides ``round_to`` (it needs the model's groups) and keeps the settings with
    that decision as :attr:`settings`; :attr:`config` is their decided values. ``fingerprint`` (see
    :mod:`upop.engine.resume`) is stored with every state and a resumed state must carry the same.

    Messages go to the ``upop`` logger (and to ``log``, if given); without bars (``progress=False``)
    the loops log a progress line every ``progress_every`` seconds. Every ``log.jsonl`` record
    (:meth:`record`) also goes to the tracker of ``report_to`` (:attr:`tracking`, under
    ``OUT/tracking``), which the caller closes when the run is over.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        train,
        val,
        settings: ResolvedSettings | UPopConfig,
        processor,
        out_dir: str | os.PathLike,
        resume: bool = False,
        base_model: str = "",
        log: Callable[[str], None] | None = None,
        progress: bool = True,
        stop_after: int | None = None,
        fingerprint: dict | None = None,
    ):
        self.model, self.task, self.train_set, self.val_set = model, task, train, val
        self.processor = processor
        self.out = Path(out_dir)
        self.state_dir = self.out / "state"
        self.resume, self.base_model, self._log, self.progress = resume, base_model, log, progress
        self.stop_after = stop_after  # testing hook: stop (as if killed) after this many total steps
        self.fingerprint = fingerprint or {}
        config = settings.config() if isinstance(settings, ResolvedSettings) else settings
        self.acc = make_accelerator(config, self.out / TRACKING_DIR)
        self.collate = task.collator(processor, seed=config.seed)
        check_shards(len(train), config.batch_size, self.acc.num_processes)
        self.spe = steps_per_epoch(len(train), config.batch_size, self.acc.num_processes)
        self.search_steps = config.search_epochs * self.spe
        self.retrain_steps = config.retrain_epochs * self.spe
        if not isinstance(settings, ResolvedSettings):
            settings = config.resolve(task, device_type=self.acc.device.type, processes=self.acc.num_processes,
                                      search_steps=self.search_steps, length=run_length(
                                          config, len(train), self.spe, self.acc.num_processes))
        elif settings.search_steps != self.search_steps:
            raise ValueError(f"the settings were resolved for a search of {settings.search_steps} steps; this run's "
                             f"has {self.search_steps}")
        self.interval = settings["interval"]
        # the width multiple (round_to "auto" depends on the device and the narrowest group); the groups
        # are those the search ranks (--modalities, refused here, before the folder is touched, if it
        # selects none of a modality)
        groups = searched_groups(find_groups(model, granularity=config.granularity), config.modalities, model)
        self.round_to, self.round_to_why = resolve_round_to(config.round_to, groups, self.acc.device.type,
                                                            config.allocation)
        #: the run's resolved settings, ``round_to`` decided; :attr:`config`: their decided values
        self.settings = settings.decide("round_to", self.round_to, self.round_to_why)
        self.config = self.settings.config()
        self.tracking = Tracking(self.acc, "upop", {"task": task.name, **self.settings.values})
        check_reachable(groups, config.ratio, self.round_to, config.cost)  # before the folder is touched
        if config.gradient_checkpointing:
            check_gradient_checkpointing(model)
        #: the training memory the run needs at least and what its device has (None off CUDA), for the report
        self.memory = self._check_memory(model, groups)
        self._steps_done = 0
        self._ddp_names: list[str] | None = None  # the wrapped model's parameters, in DDP's order
        self.signals = StopSignals()
        self.teacher, self.distiller = self._teacher(model)
        #: what the run distils, for the report (the distiller is released when the run ends)
        self.distill_info = self._describe_distill()

    def _check_memory(self, model: nn.Module, groups) -> dict:
        """Refuse a model that cannot train on the run's device (:func:`upop.measure.memory.check_fits`:
        CUDA only), before the model, or its teacher, moves there. The teacher counts when it stays
        through training: the task learns from it, or the run distils without a cached teacher (a
        cached one is dropped before the optimizer's states exist)."""
        cfg, mode, needs = self.config, self.settings["distill"], self.task.needs_teacher
        cached = mode == "logits" and cfg.distill_cache and caches_teacher(self.task.name)
        kept = needs or (mode != "none" and not cached)
        teacher = ("bf16" if cfg.teacher_precision == "bf16" else weights_precision(model)) if kept else None
        return check_fits(model, self.acc.device, teacher=teacher, distills=kept and not needs,
                          mask_units=sum(g.num_units for g in groups))

    def _teacher(self, model: nn.Module):
        """The frozen dense teacher (a copy of ``model`` taken before any mask or pruning, on the
        run's device) when the run distils or the task learns from it, and the distiller.

        The mode is the resolved settings' (``distill="auto"``: the logits only where the teacher's
        outputs are cached, :func:`upop.config.decide_distill`); the teacher's table is then built
        here, and where it cannot be (too large for host memory, captions behind a prompt) a run
        left on ``auto`` distils nothing and frees the copy (it would cost a teacher forward per
        step, which ``auto`` never chooses). :attr:`auto_why` says what ``auto`` chose, for the report."""
        from upop.distill.distiller import Distiller, make_teacher

        cfg, settings = self.config, self.settings
        mode, auto = settings["distill"], settings.given["distill"] == "auto"
        needs_teacher = self.task.needs_teacher
        self.auto_why = settings.why["distill"] if auto and not needs_teacher else None
        if mode == "none" and not needs_teacher:
            return None, None
        dtype = torch.bfloat16 if cfg.teacher_precision == "bf16" else None
        teacher = make_teacher(model, device=self.acc.device, dtype=dtype)
        if needs_teacher:
            self.task.set_teacher(teacher)
            if cfg.distill_cache:
                self.task.cache_teacher(self.train_set, self.processor, cfg.eval_batch_size, self.acc)
        if mode == "none":
            return teacher, None
        distiller = Distiller(teacher, mode, cfg.distill_weight, cfg.distill_temperature,
                              autocast_bf16=dtype is not None)
        if mode == "logits" and cfg.distill_cache:
            # the teacher's table is built now, before any training memory exists, and the dense copy
            # is dropped at once (its memory goes back before the first step's optimizer state)
            factory = self.task.teacher_replay(teacher, self.train_set, self.processor, cfg.eval_batch_size, self.acc)
            built = factory() if factory is not None else None
            if built is not None:
                distiller.use_replay(built)
                return None, distiller
            if auto:  # free or not at all: without a table, no distillation
                distiller.close()
                self.auto_why = ("off: the teacher's outputs cannot be cached here (a table over "
                                 "host-memory's limit, or captions behind a prompt)")
                return None, None
        return teacher, distiller

    def _describe_distill(self) -> dict:
        """What the run distils, for the report (with what ``distill="auto"`` chose and why)."""
        info = self.distiller.describe() if self.distiller is not None else {"mode": "none"}
        if self.auto_why is not None:
            info.update(setting="auto", why=self.auto_why)
        return info

    def task_loss(self, wrapped: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(task loss, distillation term or None)`` of ``batch``."""
        if self.distiller is None:
            return self.task.loss(wrapped, batch), None
        out = self.distiller.loss(self.task.loss, wrapped, self.acc.unwrap_model(wrapped), batch)
        if self.teacher is not None and self.distiller.teacher_released and not self.task.needs_teacher:
            self.teacher = None  # the cached teacher: the dense copy's memory is freed
        return out

    # helpers ---------------------------------------------------------------------------------
    def _batches(self, start: int, stop: int) -> Iterator[dict[str, torch.Tensor]]:
        """This process's training batches of steps ``start .. stop-1``, on the device."""
        for batch in step_batches(self.train_set, self.collate, batch_size=self.config.batch_size,
                                  seed=self.config.seed, start=start, stop=stop, rank=self.acc.process_index,
                                  world=self.acc.num_processes,
                                  workers=self.config.workers):
            # the collated batch stays at hand: what a loss reads on the host needs no sync (host_value)
            yield DeviceBatch({k: v.to(self.acc.device, non_blocking=True) if torch.is_tensor(v) else v
                               for k, v in batch.items()}, batch)

    def log(self, message: str) -> None:
        """Say ``message`` (main process): to the ``upop`` logger, and to the ``log`` callable if given."""
        if self.acc.is_main_process:
            logger.info(message)
            if self._log is not None:
                self._log(message)

    def record(self, record: dict) -> None:
        """Append ``record`` to ``log.jsonl`` and send its numbers to the tracker (main process)."""
        append_log(self.out, record, self.acc.is_main_process)
        self.tracking.log(record)

    def save_state(self, state: dict) -> None:
        """Write ``state/run.pt`` atomically (main process), with every process's RNG state."""
        from accelerate.utils import gather_object

        rng = gather_object([rng_state()]) if self.acc.num_processes > 1 else [rng_state()]
        if self.acc.is_main_process:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            state["rng"] = rng
            state["fingerprint"] = self.fingerprint
            state["totals"] = {"search": self.search_steps, "retrain": self.retrain_steps}
            with disk_full_guard(self.state_dir / STATE_FILE, self.state_dir):
                torch_save_atomic(state, self.state_dir / STATE_FILE)
        self.acc.wait_for_everyone()

    def load_state(self) -> dict | None:
        """The saved run state (checked: see :func:`upop.engine.resume.read_state`), or None."""
        return read_state(self.state_dir / STATE_FILE, self.fingerprint,
                          {"search": self.search_steps, "retrain": self.retrain_steps})

    def restore_rng(self, state: dict) -> None:
        rng = state["rng"]
        set_rng_state(rng[self.acc.process_index] if isinstance(rng, list) else rng)

    def scaler_state(self) -> dict | None:
        scaler = getattr(self.acc, "scaler", None)
        return scaler.state_dict() if scaler is not None else None

    def load_scaler(self, state: dict) -> None:
        scaler = getattr(self.acc, "scaler", None)
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])

    def identical(self, tensors) -> bool:
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

    def check_same_weights(self, model: nn.Module, phase: str, step: int) -> None:
        """Every process must hold the same weights (data parallelism averages the gradients); a
        task whose loss bypasses the wrapped model's forward would let them drift apart."""
        if self.acc.num_processes == 1:
            return
        identical = self.identical(p for p in model.parameters())
        self.record({"phase": "sync", "after": phase, "step": step, "processes": self.acc.num_processes,
                   "weights_identical": identical})
        if not identical:
            raise TrainingError(f"the {self.acc.num_processes} processes hold different weights after {phase} step "
                                f"{step}: task {self.task.name!r} does not synchronise its gradients; this is a bug, "
                                "please report it")

    def check_same_plan(self, plan: PruningPlan) -> None:
        """Every process must have chosen the same plan (masks are kept identical by averaging
        the mask gradients); a mismatch stops the run instead of saving a wrong model."""
        if self.acc.num_processes == 1:
            return
        from accelerate.utils import gather_object

        mine = json.dumps({k: v.kept for k, v in sorted(plan.groups.items())})
        plans = gather_object([mine])
        identical = all(p == plans[0] for p in plans)
        self.record({"phase": "prune", "processes": self.acc.num_processes, "plans_identical": identical})
        if not identical:
            raise TrainingError(f"the {self.acc.num_processes} processes chose different plans; this is a bug, please report it")

    def tick(self) -> None:
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
        says where it happened and how to continue; DDP's error about parameters that got no
        gradient becomes one line naming them; anything else (a bug) is left as it is."""
        unused = ddp_unused(exc, self._ddp_names)
        if unused is not None:
            return self._ddp_failure(unused, phase, step)
        if isinstance(exc, UPopError) and not isinstance(exc, TrainingError) and not getattr(exc, "located", False):
            message = str(exc).strip()
            if "\n" in message:  # re-raised from a DataLoader worker: the original message is the last line
                message = message.splitlines()[-1].split(": ", 1)[-1]
            error = type(exc)(f"{message} (at {self._where(phase, step)}); the run is saved in {self.out}: once "
                              "fixed, run the same command with --resume")
            error.located = True
            return error
        return exc

    def _ddp_failure(self, unused: list[str], phase: str, step: int) -> TrainingError:
        """The one line of DDP's "unfinished reduction": raised at the forward of ``step``, about
        the backward of the step before. Every process finds it together (the main process
        prints it)."""
        shown = ", ".join(repr(n) for n in unused[:8]) + (f" and {len(unused) - 8} more" if len(unused) > 8 else "")
        error = TrainingError(
            f"data parallelism failed at {self._where(phase, max(step - 1, 0))}: parameter"
            f"{'s' if len(unused) != 1 else ''} {shown or '(not named by torch)'} got no gradient in that step (a "
            "part of the model the loss skips in some steps only); this is a bug, please report it; the last good "
            f"checkpoint is in {self.state_dir}")
        error.shared = True
        return error

    def prepare(self, model: nn.Module, optimizer, phase: str, start: int, total: int):
        """``acc.prepare(model, optimizer)`` for ``phase`` (steps ``start .. total-1``).

        Several processes wrap the model in DDP, which by default expects a gradient for every
        parameter in every step; a parameter the task's loss never reaches (DINOv2's
        ``mask_token``, SigLIP's vision ``head`` under classification) stops the second step.
        The parameters the first step's loss does not reach are found once (:meth:`_unused`) and
        only then is DDP told to look for unused parameters every step. Why this and not the
        others: ``find_unused_parameters`` stays correct if the set changes from step to step
        (with the data, or with masks), and its cost (a walk over the autograd graph each step,
        and torch's warning when there is nothing to find) is paid only by models that need it;
        freezing the parameters found, or DDP's ``static_graph``, would be wrong as soon as a
        parameter unused in the first step is used in a later one. A parameter no process uses
        gets no gradient (DDP leaves it ``None``), so AdamW skips it as with one process: it stays
        bit-identical to the dense model's."""
        if self.acc.num_processes > 1:
            unused = self._unused(model, phase, start, total)
            self.acc.ddp_handler.find_unused_parameters = bool(unused)
            self.record({"phase": "ddp", "of": phase, "unused_parameters": unused,
                       "find_unused_parameters": bool(unused)})
            self._ddp_names = reducer_names(model)
        return self.acc.prepare(model, optimizer)

    def _unused(self, model: nn.Module, phase: str, start: int, total: int) -> list[str]:
        """Names of the trainable parameters the task loss of step ``start``'s batch does not reach
        on some process (a forward in training mode, no backward; the random state, the buffers,
        e.g. BatchNorm's running statistics, and the mode are put back: the run is the one it
        would be without this look). An error in the loss is that of ``phase``'s step ``start``."""
        if start >= total:
            return []
        rng = rng_state()
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        training = model.training
        model.train()
        try:
            batch = next(iter(step_batches(self.train_set, self.collate, batch_size=self.config.batch_size,
                                           seed=self.config.seed, start=start, stop=start + 1,
                                           rank=self.acc.process_index, world=self.acc.num_processes)))
            batch = {k: v.to(self.acc.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with self.acc.autocast():
                reached = graph_parameters(self.task.loss(model, batch))
        except Exception as exc:
            raise self._failure(exc, phase, start) from None
        finally:
            model.train(training)
            set_rng_state(rng)
            with torch.no_grad():
                for name, b in model.named_buffers():
                    if name in buffers:
                        b.copy_(buffers[name])
        names = reducer_names(model)
        params = dict(model.named_parameters())
        missing = torch.tensor([float(id(params[n]) not in reached) for n in names], device=self.acc.device)
        missing = self.acc.reduce(missing, reduction="sum")
        return [n for n, flag in zip(names, missing.tolist()) if flag > 0]

    def forward(self, compute: Callable[[], tuple[torch.Tensor, torch.Tensor]], phase: str, step: int):
        """Run one step's forward and agree with the other processes on how it went.

        ``compute()`` returns ``(loss to backpropagate, task loss to log)``. An exception in it is
        raised at once, on this process only: the others may be inside a collective of the
        forward, so this process must not enter another one; it leaves (the CLI exits at once)
        and the launcher stops the others. Otherwise every process all-reduces (task loss,
        non-finite count, stop requests) in ONE collective, on the device; the step loop reads the
        result with the step's other values, once, after backward (:class:`upop.engine.loop.Pending`),
        and settles it: a non-finite loss on any process stops every process at this step, before
        the optimizer step, with one line naming the step (the last checkpoint stays as it was); a
        stop request (SIGTERM / SIGINT) on any process makes every process finish this step and
        stop after it. Returns ``(loss, Pending)``; settled, ``(mean task loss over processes, stop
        requested)``.
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

        def settle(host: torch.Tensor) -> tuple[float, bool]:
            loss_sum, nonfinite, stop = host.tolist()
            if nonfinite:
                self._stop_nonfinite(loss, task_loss, phase, step)
            return loss_sum / self.acc.num_processes, bool(stop)

        return loss, Pending(stats, settle)

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

    def after_step(self, stop: bool, phase: str, done: int, total: int, save: Callable[[], None]) -> None:
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

    def bar(self, total: int, initial: int, desc: str):
        """The progress bar of a loop; without bars, the main process's :class:`ProgressLog`."""
        if not self.progress and self.acc.is_main_process:
            return ProgressLog(total, initial, desc, every=self.config.progress_every)
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
                self.distill_info = self._describe_distill()
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
                self.signals.where = f"during the search; the run is saved in {self.out}"
                plan = self._search(state)
                state = None
                self._stop_if_requested("after the search and the pruning")
            else:
                plan = PruningPlan.from_dict(state["plan"])
            self.signals.where = f"during the retraining; the run is saved in {self.out}"
            result = self._retrain(plan, state)
            self._stop_if_requested("after the retraining")
            return result

    def _stop_if_requested(self, when: str) -> None:
        """At a phase boundary (its state just saved): stop if a signal came after the loop's
        last step, when the loop no longer stops (validation, the last save, pruning); otherwise
        it would be swallowed and the run go on to the end. The processes agree first (a signal
        may reach only some of them); every process stops, the main process says so."""
        flag = torch.tensor([float(self.signals.requested is not None)], device=self.acc.device)
        if self.acc.num_processes > 1:
            flag = self.acc.reduce(flag, reduction="sum")
        if not flag.item():
            return
        signum = self.signals.requested or signal.SIGTERM
        name = signal.Signals(signum).name if self.signals.requested else "a stop request on another process"
        stopped = RunStopped(f"stopped by {name} {when}; the run is saved in {self.out}", 128 + int(signum))
        stopped.shared = True
        raise stopped

    def run_loop(self, loop, phase: str, start: int, total: int, bar) -> None:
        """Steps ``start .. total-1`` of ``phase`` on ``loop``; the progress bar is closed (cleared)
        before anything else is printed, also when a step raises."""
        self.signals.in_loop = True
        step = [start]
        def batches():
            for step[0], batch in zip(range(start, total), self._batches(start, total)):
                yield batch
        try:
            loop.run(start, total, batches(), bar)
        except DataError as exc:  # a file that changed on disk after the check, found by the reader
            raise self._failure(exc, phase, step[0]) from None
        except FloatingPointError as exc:  # a non-finite mask gradient since the last update
            raise TrainingError(f"{exc}; the last good checkpoint is in {self.state_dir}") from None
        finally:
            self.signals.in_loop = False

    def latency_costs(self, model: nn.Module, groups) -> dict[str, float]:
        """Milliseconds per unit of every group (``cost="latency"``), measured on the main process
        on the run's device, latency batch and evaluation dtype, or read from the run's cache."""
        from upop.measure.latency_table import TABLE_FILE, load_or_measure

        box = [None]
        if self.acc.is_main_process:
            dtype = torch.bfloat16 if self.config.eval_precision == "bf16" else torch.float32
            table, reused = load_or_measure(self.state_dir / TABLE_FILE, model, groups, self.config.latency_batch_size,
                                            self.acc.device, dtype, self.round_to)
            self.record({"phase": "latency-table", "reused": reused, "per_unit_ms": table["per_unit_ms"]})
            box = [table["per_unit_ms"]]
        if self.acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(box)
        return box[0]

    def _search(self, state: dict | None) -> PruningPlan:
        return search_phase(self, state)

    def _retrain(self, plan: PruningPlan, state: dict | None) -> PhaseResult:
        return retrain_phase(self, plan, state)


def run_length(config: UPopConfig, samples: int, spe: int, processes: int) -> str:
    """The search's length in words, for the error of a search no longer than its interval."""
    return (f"{config.search_epochs} epochs of {spe}: {samples} samples / ({config.batch_size} x {processes} "
            "processes)")


__all__ = ["Run", "RunStopped", "STATE_FILE", "TrainingError", "batch_indices", "finetune", "seed_everything",
           "step_batches", "steps_per_epoch"]
