"""Semantic segmentation with the Segmenter model: per-pixel cross-entropy; mIoU and pixel accuracy.

Labels are class ids with 255 = ignore (:mod:`upop.data.ade20k`); when the data names its
classes they are the model's ``id2label`` ids (:meth:`SegmentationTask.check_data`). Evaluation
accumulates a confusion matrix over the split at the model's input resolution (label maps are
resized with nearest-neighbour sampling); ``miou`` is the mean IoU over the classes that occur
in the ground truth or the prediction, ``pixel_acc`` the share of non-ignored pixels predicted
right, both in percent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.ade20k import IGNORE_INDEX, ADE20KDataset, SegmentationCollator
from ..data.labels import align_classes
from ..errors import DataError, show
from ._shard import evaluating, map_batches
from .base import Task, unwrap


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``(num_classes, num_classes)`` counts, rows = ground truth, columns = prediction."""
    valid = target != ignore_index
    t, p = target[valid].long(), pred[valid].long()
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def segmentation_metrics(conf: torch.Tensor) -> dict[str, float]:
    """``miou`` (over classes present in GT or prediction) and ``pixel_acc``, in percent."""
    conf = conf.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    present = union > 0
    miou = float((inter[present] / union[present]).mean()) if present.any() else 0.0
    total = float(conf.sum())
    return {"miou": 100.0 * miou, "pixel_acc": 100.0 * float(inter.sum()) / total if total else 0.0}


def check_labels(model: nn.Module, labels: torch.Tensor) -> None:
    n = int(unwrap(model).config.num_labels)
    valid = labels[labels != IGNORE_INDEX]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= n):
        raise DataError(f"label id {int(valid.max())} does not fit the model: it has num_labels={n} (ids 0..{n - 1})")


class SegmentationTask(Task):
    name = "segmentation"
    model_classes = ("SegmenterForSemanticSegmentation",)
    main_metric = "miou"

    def load_splits(self, data_dir, splits=("train", "val", "test")):
        return {s: ADE20KDataset.from_split(data_dir, s) for s in splits}

    def collator(self, processor, seed: int = 0):
        return SegmentationCollator(processor)

    def check_data(self, model: nn.Module, dataset) -> None:
        """The dataset's classes must be the model's; label the dataset with the model's ids.

        The number of classes must be ``num_labels``. When the data names its classes
        (``classes.json`` / ``objectInfo150``), each gets the model's ``id2label`` id of its name,
        or a model with default ``LABEL_i`` names takes the data's names (see
        :mod:`upop.data.labels`). Call it on every split before training or evaluating.
        """
        n = getattr(dataset, "num_classes", None)
        if n is None:
            return
        num_labels = int(unwrap(model).config.num_labels)
        if n != num_labels:
            raise DataError(f"the data has {n} classes but the model has num_labels={num_labels}; they must be "
                            "equal (the class count comes from DIR/classes.json or objectInfo150, else 150 for "
                            "ADE20K)")
        class_file = getattr(dataset, "class_file", None)
        if class_file is not None:
            dataset.set_label_ids(align_classes(unwrap(model).config, dataset.classes,
                                                f"the class list {show(class_file)}"))

    def loss(self, model: nn.Module, batch):
        labels = batch["labels"]
        check_labels(model, labels)
        logits = model(pixel_values=batch["pixel_values"]).logits
        if bool((labels == IGNORE_INDEX).all()):
            return logits.sum() * 0.0  # nothing to learn from this batch
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)

    @torch.no_grad()
    def evaluate(self, model, dataset, processor, batch_size: int = 64, accelerator=None):
        self.check_data(model, dataset)
        collate = self.collator(processor)
        device = next(model.parameters()).device
        n = int(unwrap(model).config.num_labels)
        conf = torch.zeros(n, n, dtype=torch.long)

        def run(lo: int, hi: int) -> torch.Tensor:
            batch = collate([dataset[i] for i in range(lo, hi)])
            check_labels(model, batch["labels"])
            pred = model(pixel_values=batch["pixel_values"].to(device)).logits.argmax(1).cpu()
            return confusion_matrix(pred, batch["labels"], n)

        with evaluating(model):
            for part in map_batches(len(dataset), batch_size, run, accelerator):
                conf += part
        return segmentation_metrics(conf)

    def example_inputs(self, model, processor, dataset, batch_size: int = 1):
        batch = self.collator(processor)([dataset[i % len(dataset)] for i in range(batch_size)])
        return {"pixel_values": batch["pixel_values"].to(next(model.parameters()).device)}


__all__ = ["SegmentationTask", "confusion_matrix", "segmentation_metrics"]
