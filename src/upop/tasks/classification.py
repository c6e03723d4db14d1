"""Image classification with ViT / DeiT / DINOv2 / SigLIP (``SiglipForImageClassification``):
cross-entropy loss; top-1 and top-5 accuracy (percent). SigLIP2's classifier is not taken: its
NaFlex processor gives each image its own patch grid (``pixel_attention_mask``, ``spatial_shapes``),
which DeiT's crops and this collator do not produce.

``DeiTForImageClassificationWithTeacher`` has two heads and no loss in its forward: the loss is
the mean of the cross-entropies of ``cls_logits`` and ``distillation_logits`` against the labels
(hard-label training of both heads, no teacher at hand), and its ``logits`` (their mean) are
evaluated. Data: ImageFolder (:mod:`upop.data.imagefolder`); the number of class folders must
equal ``model.config.num_labels``, and :meth:`ClassificationTask.check_data` gives each class
the model's ``id2label`` id of its name, or names a new classifier's classes
(:func:`upop.data.labels.align_classes`).

Training follows DeiT's recipe when the ``augment`` setting is ``"deit"`` (the default): the
collator crops and draws the augmentation (:mod:`upop.data.augment`), the loss augments and mixes
the whole batch on its device (:mod:`upop.data.augment_batch`, no gradients) and takes the
soft-target cross-entropy against the label-smoothed (0.1) mixed targets; ``"none"`` trains on the processor's resized images with
the plain cross-entropy. Evaluation is DeiT's: images larger than the input are resized to
``input / 0.875`` and centre-cropped (:meth:`~upop.data.imagefolder.ImageClassificationCollator.collate_eval`).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from upop.distill import distiller as distill
from upop.data.check import check_classification, classification_context
from upop.data.shapes_vision import CLASSIFICATION_CLASSES, write_classification
from upop.data.augment import AUGMENT_CHOICES, soft_targets
from upop.data.augment_batch import augment_batch
from upop.data.imagefolder import ImageClassificationCollator, load_imagefolder
from upop.data.labels import align_classes
from upop.data.user_rows import RowSchema
from upop.errors import DataError, show
from upop.measure.host_sync import host_value
from upop.tasks._shard import collated, evaluating, map_batches
from upop.tasks.base import Task, unwrap
from upop.tasks.registry import register_task

WITH_TEACHER = "DeiTForImageClassificationWithTeacher"


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """``{"top1": ..., "top5": ...}`` in percent; ``k`` larger than the class count counts every class."""
    out = {}
    for k in ks:
        top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
        out[f"top{k}"] = 100.0 * float((top == labels.unsqueeze(-1)).any(dim=-1).float().mean())
    return out


def _num_labels(model: nn.Module) -> int:
    return int(unwrap(model).config.num_labels)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum(targets * log_softmax(logits))``."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def check_labels(model: nn.Module, labels: torch.Tensor) -> None:
    """Every label id must be a class of the model."""
    n = _num_labels(model)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n):
        raise DataError(f"label id {int(labels.max())} does not fit the model: it has num_labels={n} "
                        f"(ids 0..{n - 1}); the data has more classes than the model")


class ClassificationTask(Task):
    name = "classification"
    main_metric = "top1"
    #: training augmentation: "deit" (DeiT's recipe) or "none" (the processor's resize only)
    augment = AUGMENT_CHOICES[0]
    settings = ("augment",)
    #: rows from Python: an image and its class id (the model's id); Trainer-style rows are fed as
    #: they are, without DeiT's crops (they need the raw image)
    row_schema = RowSchema(required=("image", "label"), aliases={"image": ("img",), "label": ("labels",)},
                           trainer=("pixel_values", "labels"), trainer_needs={"augment": "none"})

    def load_splits(self, data_dir, splits=("train", "val", "test")):
        return load_imagefolder(data_dir, splits)

    def collator(self, processor, seed: int = 0):
        return ImageClassificationCollator(processor, augment=self.augment, seed=seed)

    def check_data(self, model: nn.Module, dataset) -> None:
        """The dataset's classes must be the model's classes; label the dataset with the model's ids.

        Same number of classes as ``num_labels``; then each class folder's samples are labelled
        with the model's ``id2label`` id of its name, or a model with default ``LABEL_i`` names
        takes the folder names (see :mod:`upop.data.labels`). Call it on every split before
        training or evaluating: it changes the labels the dataset yields.
        """
        classes = getattr(dataset, "classes", None)
        if classes is None:
            return
        split = show(getattr(dataset, "split", "") or "dataset")
        if len(classes) != _num_labels(model):
            raise DataError(f"the data ({split}) has {len(classes)} class folders but the model has "
                            f"num_labels={_num_labels(model)}; they must be equal")
        label_ids = align_classes(unwrap(model).config, classes, f"the class folders of {split}")
        if hasattr(dataset, "set_label_ids"):
            dataset.set_label_ids(label_ids)
        elif label_ids != list(range(len(classes))):
            raise DataError(f"the classes of {split} are numbered differently from the model's config.id2label and "
                            f"a {type(dataset).__name__} cannot be relabelled (order its classes like the model)")

    @staticmethod
    def logits(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=pixel_values).logits

    def loss(self, model: nn.Module, batch):
        """Cross-entropy of the batch; a ``"deit"`` training batch is first augmented on its device
        (in place: :func:`~upop.data.augment_batch.augment_batch`)."""
        check_labels(model, host_value(batch, "labels"))  # the collated labels: no wait for the device
        batch = augment_batch(batch)
        labels = batch["labels"]
        out = model(pixel_values=batch["pixel_values"])
        if "mix_weight" in batch:  # augmented batch: label-smoothed mixed targets
            targets = soft_targets(labels, batch["mix_partner"], batch["mix_weight"], _num_labels(model))
            criterion = partial(soft_cross_entropy, targets=targets)
        else:
            criterion = partial(F.cross_entropy, target=labels)
        distill.expose("logits", out.logits)
        if hasattr(out, "distillation_logits") and out.distillation_logits is not None:
            return (criterion(out.cls_logits) + criterion(out.distillation_logits)) / 2
        return criterion(out.logits)

    @torch.no_grad()
    def evaluate(self, model, dataset, processor, batch_size: int = 64, accelerator=None):
        self.check_data(model, dataset)
        load = collated(ImageClassificationCollator(processor).collate_eval, dataset.__getitem__)
        device = next(model.parameters()).device

        def run(batch: dict):
            check_labels(model, batch["labels"])
            pixels = batch["pixel_values"].to(device, non_blocking=True)
            return self.logits(model, pixels).float().cpu(), batch["labels"]

        with evaluating(model):
            logits, labels = zip(*map_batches(len(dataset), batch_size, run, accelerator, load=load))
        return topk_accuracy(torch.cat(logits), torch.cat(labels))

    def example_inputs(self, model, processor, dataset, batch_size: int = 1):
        batch = ImageClassificationCollator(processor).collate_eval([dataset[i % len(dataset)]
                                                                     for i in range(batch_size)])
        return {"pixel_values": batch["pixel_values"].to(next(model.parameters()).device)}


register_task(
    name="classification", task=ClassificationTask, writer=write_classification, checker=check_classification,
    check_context=classification_context,
    min_split=len(CLASSIFICATION_CLASSES), min_split_why="one per class",
    summary="image classification with ViT, DeiT, DINOv2 or SigLIP; ImageFolder; top-1 and top-5 accuracy",
)
