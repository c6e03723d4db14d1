"""The one training loop of upop: a step skeleton that the search, the retraining and plain
fine-tuning share, with what each phase adds written as callbacks.

One step (:meth:`StepLoop.step`):

1. forward: the loss function gives ``(task loss, extra term or None)`` (the extra term is the
   distillation from the dense model); callbacks may add to the loss (:meth:`LoopCallback.extend_loss`,
   e.g. the search's sparsity term); the run's ``forward`` wrapper agrees with the other processes
   on the loss and on stop requests, on the device (:class:`Pending`: nothing read yet);
2. backward (the Accelerator's, which scales under fp16), then :meth:`LoopCallback.to_read` (the
   search accumulates the mask gradients here, unscaled, and on an update step asks for their sums);
3. the step's ONE device-to-host read: the forward's values and what the callbacks asked for, in one
   transfer; a non-finite loss anywhere stops every process here, before the optimizer step; then
   :meth:`LoopCallback.after_backward` with each callback's values (the search selects and projects);
4. gradient clipping, optimizer step, scheduler step, gradients zeroed;
5. :meth:`LoopCallback.after_step` completes the step's log record, which is logged;
6. :meth:`LoopCallback.step_end` with the number of steps done: validation, checkpoints, a stop.

:class:`upop.engine.callback.UPopCallback` is the UPop search on this loop; the same object drives
:class:`upop.integrations.transformers.callback.UPopTrainerCallback` inside a ``transformers.Trainer``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from upop.engine.runtime import step_batches, steps_per_epoch
from upop.measure import host_sync


class LoopCallback:
    """What a phase adds to the training step. Every hook is optional."""

    def extend_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to backpropagate, given the task loss so far (inside autocast)."""
        return loss

    def to_read(self, step: int) -> torch.Tensor | None:
        """After backward: a 1-D tensor on the device whose values this step needs on the host
        (None: nothing). The loop reads it with the forward's values, in one transfer."""
        return None

    def after_backward(self, step: int, record: dict, host: torch.Tensor | None = None) -> None:
        """After backward and the step's read, before clipping and the optimizer step; may add to
        the log ``record``. ``host``: the host copy of what :meth:`to_read` returned (float64)."""

    def after_step(self, step: int, record: dict) -> None:
        """After the optimizer and scheduler steps, before ``record`` is logged."""

    def step_end(self, done: int, stop: bool) -> None:
        """After the step is logged; ``done`` steps are finished; ``stop``: a stop was requested."""


@dataclass
class Pending:
    """What a step's forward leaves on the device: ``values`` (a 1-D tensor) and ``settle(host)``,
    which turns their host copy into ``(task loss value, stop requested)`` (and raises where the
    forward went wrong, e.g. a non-finite loss)."""

    values: torch.Tensor
    settle: Callable[[torch.Tensor], tuple[float, bool]]


def _plain_forward(compute, step: int):
    loss, task_loss = compute()
    return loss, Pending(task_loss.detach().float().reshape(1), lambda host: (float(host[0]), False))


def read_together(tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """The host copies (float64) of ``tensors`` (1-D, on one device; None stays None), read in one
    device-to-host transfer."""
    present = [t for t in tensors if t is not None]
    flat = torch.cat([t.detach().to(torch.float64).reshape(-1) for t in present]).cpu()
    parts = iter(flat.split([t.numel() for t in present]))
    return [None if t is None else next(parts) for t in tensors]


class StepLoop:
    """The step skeleton over ``model`` (the module the forward runs on: the wrapped model under
    several processes).

    ``loss_fn(model, batch)`` returns ``(task loss, extra term or None)``. ``forward(compute,
    step)`` runs ``compute() -> (loss, task loss)`` and returns ``(loss, Pending)`` (default:
    plain, one process); ``backward`` defaults to ``loss.backward()``; ``clip``, if
    given, is called before the optimizer step; ``record(dict)`` receives every step's log record.
    """

    def __init__(self, phase: str, model: nn.Module, optimizer, loss_fn: Callable, *, scheduler=None,
                 callbacks: Sequence[LoopCallback] = (), forward: Callable | None = None,
                 backward: Callable | None = None, clip: Callable[[], None] | None = None,
                 record: Callable[[dict], None] | None = None, log_lr: bool = True):
        self.phase, self.model, self.optimizer, self.loss_fn = phase, model, optimizer, loss_fn
        self.scheduler, self.callbacks = scheduler, list(callbacks)
        self.forward = forward or _plain_forward
        self.backward = backward or (lambda loss: loss.backward())
        self.clip, self.record, self.log_lr = clip, record, log_lr

    def step(self, step: int, batch: dict) -> dict:
        """One training step on ``batch``; returns its log record. Under
        :func:`upop.measure.host_sync.count_steps` its host syncs are counted, the training part and
        the end (:meth:`LoopCallback.step_end`) apart."""
        watch = host_sync.watching()
        if watch is None:
            record, stop = self._train(step, batch)
            self._end(step, stop)
            return record
        with watch.part(self.phase, step, "step"):
            record, stop = self._train(step, batch)
        with watch.part(self.phase, step, "end"):
            self._end(step, stop)
        return record

    def _train(self, step: int, batch: dict) -> tuple[dict, bool]:
        """Forward, backward, optimizer and the log record: ``(record, stop requested)``."""
        callbacks = self.callbacks

        def compute():
            task_loss, extra = self.loss_fn(self.model, batch)
            loss = task_loss
            for cb in callbacks:
                loss = cb.extend_loss(loss)
            return (loss if extra is None else loss + extra), task_loss

        loss, pending = self.forward(compute, step)
        self.backward(loss)
        asked = [cb.to_read(step) for cb in callbacks]
        forward_values, *host = read_together([pending.values, *asked])
        task_value, stop = pending.settle(forward_values)
        record = {"phase": self.phase, "step": step, "loss": task_value}
        for cb, values in zip(callbacks, host):
            cb.after_backward(step, record, values)
        if self.clip is not None:
            self.clip()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None and self.log_lr:
            record["lr"] = self.scheduler.get_last_lr()[0]
        for cb in callbacks:
            cb.after_step(step, record)
        if self.record is not None:
            self.record(record)
        return record, stop

    def _end(self, step: int, stop: bool) -> None:
        for cb in self.callbacks:
            cb.step_end(step + 1, stop)

    def run(self, start: int, total: int, batches: Iterable[dict], bar=None) -> None:
        """Steps ``start .. total-1`` over ``batches`` (those steps' batches, in order), updating
        the progress ``bar``, which is closed (cleared) also when a step raises."""
        try:
            for step, batch in zip(range(start, total), batches):
                self.step(step, batch)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()


def cosine(total: int, warmup_steps: int = 0) -> Callable[[int], float]:
    """The learning-rate factor of step ``s``: linear warm-up over ``warmup_steps``, then a cosine
    from 1 to 0 over the remaining steps of ``total`` (held at 0 after ``total``)."""
    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * min(s - warmup_steps, total) / max(1, total - warmup_steps)))
    return factor


class _KeepBest(LoopCallback):
    """Fine-tuning: evaluate after every epoch, keep the best weights on validation."""

    def __init__(self, model, task, val, processor, spe: int, epochs: int, log, bar):
        self.model, self.task, self.val, self.processor = model, task, val, processor
        self.spe, self.epochs, self.log, self.bar = spe, epochs, log, bar
        self.best, self.best_state, self.best_metrics = None, None, {}
        self.last_loss = float("nan")

    def after_step(self, step: int, record: dict) -> None:
        self.last_loss = record["loss"]
        self.bar.set_postfix(loss=f"{self.last_loss:.4f}")

    def step_end(self, done: int, stop: bool) -> None:
        if done % self.spe:
            return
        metrics = self.task.evaluate(self.model, self.val, self.processor)
        self.log(f"epoch {done // self.spe}/{self.epochs}: loss {self.last_loss:.4f} "
                 + " ".join(f"{k} {v:.1f}" for k, v in metrics.items()))
        if self.task.is_better(metrics[self.task.main_metric], self.best):
            self.best, self.best_metrics = metrics[self.task.main_metric], metrics
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.train()


def finetune(
    model: nn.Module, task, train, val, processor, *, epochs: int, lr: float, batch_size: int,
    seed: int = 0, weight_decay: float = 0.05, warmup_steps: int = 0, log: Callable[[str], None] = print,
    progress: bool = True, workers: int = 0,
) -> tuple[nn.Module, dict[str, float]]:
    """Plain training of ``model`` on ``task`` (AdamW, warm-up then cosine) on the step loop,
    keeping the best weights on validation (one process). Used to train the demo model and as the
    baseline in benchmarks. The task checks the model first (:meth:`upop.tasks.base.Task.check_model`),
    which also tells it what kind of model it trains: a chat model gets its chat collator."""
    from tqdm.auto import tqdm

    task.check_model(model)
    collate = task.collator(processor, seed=seed)
    spe = steps_per_epoch(len(train), batch_size)
    total = epochs * spe
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine(total, warmup_steps))
    torch.manual_seed(seed)
    bar = tqdm(total=total, desc="train", disable=not progress, dynamic_ncols=True)
    keep = _KeepBest(model, task, val, processor, spe, epochs, log, bar)
    loop = StepLoop("train", model, optimizer, lambda m, batch: (task.loss(m, batch), None), scheduler=scheduler,
                    callbacks=[keep])
    model.train()
    loop.run(0, total, step_batches(train, collate, batch_size=batch_size, seed=seed, start=0, stop=total,
                                    workers=workers), bar)
    if keep.best_state is not None:
        model.load_state_dict(keep.best_state)
    return model.eval(), keep.best_metrics
