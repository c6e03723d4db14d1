"""What a task provides to the engine: data, loss, evaluation and a representative input."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from upop.data.user_rows import RowSchema
from upop.errors import TaskError


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a data-parallel wrapper (``DistributedDataParallel`` keeps it as
    ``.module``); a task reads ``config`` and submodules from it, never through the wrapper."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


class _RegisteredClasses:
    """``Task.model_classes``: the model classes whose family registration lists the task
    (:func:`upop.arch.classes_for`), on the class and on its instances alike."""

    def __get__(self, obj, owner) -> tuple[str, ...]:
        from upop.arch import classes_for

        return classes_for(owner.name)


class Task:
    """Base class of a task. Subclasses fill the class attributes and the methods."""

    name: str = ""
    #: model class names (``type(model).__name__``) the task can train and evaluate: declared by
    #: each family for its classes (``ModelClass.tasks``), never listed here
    model_classes = _RegisteredClasses()
    #: metric used to keep the best retrained checkpoint (see :attr:`higher_is_better`)
    main_metric: str = ""
    #: whether a larger ``main_metric`` is a better model (accuracy, recall...); False for a loss
    #: or a perplexity. The engine keeps the checkpoint that :meth:`is_better` prefers
    higher_is_better: bool = True

    #: the value of ``main_metric`` under which the compressed model is not yet usable: a test
    #: metric under it makes the run warn that its budget is too small, with an estimate of the
    #: retraining steps it needs (:mod:`upop.runs.budget`); None: no bar
    quality_bar: float | None = None

    #: the rows the task reads from Python (``compress(train=...)``, :mod:`upop.data.user_rows`,
    #: docs/data.md); None: only its reader's datasets (``load_splits``)
    row_schema: RowSchema | None = None

    #: task settings of :class:`~upop.config.UPopConfig` this task reads, set as attributes by
    #: :meth:`configure` (the class attributes of the same names are their defaults)
    settings: tuple[str, ...] = ()

    def is_better(self, value: float, best: float | None) -> bool:
        """Whether ``value`` of :attr:`main_metric` beats ``best`` (None: nothing yet, any value
        does), in the direction :attr:`higher_is_better` says; a NaN never beats a number."""
        if best is None:
            return True
        return value > best if self.higher_is_better else value < best

    def configure(self, config) -> "Task":
        """Take this task's settings from ``config`` (a :class:`~upop.config.UPopConfig`)."""
        for name in self.settings:
            setattr(self, name, getattr(config, name))
        return self

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`TaskError` if ``model`` cannot do this task."""
        cls = type(model).__name__
        if cls not in self.model_classes:
            raise TaskError(
                f"task {self.name!r} needs one of {', '.join(self.model_classes)}; the model is a {cls}"
            )

    def check_data(self, model: nn.Module, dataset) -> None:
        """Raise :class:`~upop.errors.DataError` if ``dataset`` does not fit ``model`` (e.g. its
        classes); may align the dataset's label ids with the model's. Nothing to check by default."""

    def load_splits(self, data_dir, splits=("train", "val", "test")) -> dict[str, Any]:
        raise NotImplementedError

    def collator(self, processor, seed: int = 0):
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, dataset, processor, batch_size: int = 64, accelerator=None) -> dict[str, float]:
        raise NotImplementedError

    def example_inputs(self, model: nn.Module, processor, dataset, batch_size: int = 1) -> dict[str, torch.Tensor]:
        """A representative input (real samples of ``dataset``) for FLOPs and latency."""
        raise NotImplementedError

    def text_tokens(self, processor, dataset) -> int | None:
        """Text length per sample, for FLOPs costs of text units (None: model maximum)."""
        return None

    # optional hooks: the defaults are what a task without a teacher does -------------------------

    #: whether the task's loss and evaluation compare the model with the frozen dense model (the
    #: label-free task): the run (:meth:`upop.engine.run.Run._teacher`) and :func:`upop.api.evaluate`
    #: then hand it over with :meth:`set_teacher` before any evaluation or training, and keep it
    #: for the whole run
    needs_teacher: bool = False

    def set_teacher(self, teacher: nn.Module) -> None:
        """Take the frozen dense model (:func:`upop.distill.distiller.make_teacher`); called by the
        run and :func:`upop.api.evaluate` when :attr:`needs_teacher` is true, refused otherwise."""
        raise TaskError(f"task {self.name!r} learns from its labels, not from a teacher (needs_teacher is False)")

    def cache_teacher(self, train, processor, batch_size: int = 64, accelerator=None) -> bool:
        """With ``distill_cache`` on, called by the run after :meth:`set_teacher`: compute the
        teacher's training targets once, instead of a teacher forward per step. Returns whether a
        table was built (by default none is)."""
        return False

    @property
    def teacher_cached(self) -> bool:
        """Whether the training targets come from :meth:`cache_teacher`'s table (the report's
        ``distill.teacher_cached`` for a task that :attr:`needs_teacher`)."""
        return False

    def teacher_replay(self, teacher: nn.Module, train, processor, batch_size: int = 64, accelerator=None):
        """For run-level distillation (``--distill logits`` with ``distill_cache``), called by the
        run before the first step: a builder ``() -> replay or None`` of the teacher's exposed
        tensors of a batch (``replay(batch) -> {name: tensor}``, what
        :func:`upop.distill.distiller.expose` records) computed from outputs cached once, so the
        teacher need not run every step; None where the teacher must run (the default). A task that
        overrides it registers with ``teacher_cache=True`` (:func:`upop.tasks.registry.register_task`),
        which makes ``distill="auto"`` distil the logits there."""
        return None
