"""What a task provides to the engine: data, loss, evaluation and a representative input."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

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
    #: metric used to keep the best retrained checkpoint (higher is better)
    main_metric: str = ""

    #: task settings of :class:`~upop.config.UPopConfig` this task reads, set as attributes by
    #: :meth:`configure` (the class attributes of the same names are their defaults)
    settings: tuple[str, ...] = ()

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
