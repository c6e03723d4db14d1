"""Semantic segmentation with the Segmenter model: per-pixel cross-entropy; mIoU and pixel accuracy.

Labels are class ids with 255 = ignore (:mod:`upop.data.ade20k`); when the data names its
classes they are the model's ``id2label`` ids (:meth:`SegmentationTask.check_data`).

Training batches get mmseg's ADE20K augmentation when the ``augment`` setting is ``"deit"`` (the
default; :mod:`upop.data.seg_augment`), or the processor's resize with ``"none"``.

Evaluation follows Segmenter (``segm/model/utils.py`` ``inference``) and mmseg's single-scale
test: each image's shorter side is resized (bilinear, aspect kept) to the model's
``image_size`` ``S``; :func:`sliding_window` runs the model on ``S x S`` windows at stride ``S``
(the last window of a side flush with its end) and averages the logits where windows overlap;
the logits are resized bilinearly to the ORIGINAL label map's size and their argmax is compared
with it there. A confusion matrix is accumulated over the split; ``miou`` is the mean IoU over
the classes that occur in the ground truth or the prediction, ``pixel_acc`` the share of
non-ignored pixels predicted right, both in percent.
"""

from __future__ import annotations

from collections import Counter
from functools import partial
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from upop.distill import distiller as distill
from upop.data.check import check_segmentation, segmentation_context
from upop.data.shapes_vision import write_segmentation
from upop.data.ade20k import IGNORE_INDEX, ADE20KDataset, SegmentationCollator
from upop.data.augment import AUGMENT_CHOICES, normalize
from upop.data.labels import align_classes
from upop.data.user_rows import RowSchema
from upop.errors import DataError, show
from upop.measure.host_sync import host_value
from upop.tasks._shard import evaluating, map_batches
from upop.tasks.base import Task, unwrap
from upop.tasks.registry import register_task


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


def window_anchors(length: int, window: int, stride: int) -> list[int]:
    """Window starts along a side of ``length``: every ``stride`` while a window fits before the
    end, then one window flush with the end (Segmenter's ``sliding_window``); ``[0]`` if it is short."""
    if length <= window:
        return [0]
    return list(range(0, length - window, stride)) + [length - window]


def sliding_window(forward: Callable[[torch.Tensor], torch.Tensor], images: Sequence[torch.Tensor], window: int,
                   stride: int, batch_size: int) -> Iterator[torch.Tensor]:
    """For each ``(C, H, W)`` image in order, its ``(K, H, W)`` logits: the mean of the logits of
    every ``window x window`` window covering a pixel.

    ``forward`` maps ``(N, C, window, window)`` to ``(N, K, window, window)``; the windows of all
    images are run in chunks of ``batch_size``. An image shorter than the window on a side is
    zero-padded on the bottom / right and the padding's logits dropped.
    """
    shapes = [tuple(im.shape[1:]) for im in images]
    images = [im if min(im.shape[1:]) >= window else
              F.pad(im, (0, max(window - im.shape[2], 0), 0, max(window - im.shape[1], 0))) for im in images]
    sizes = [tuple(im.shape[1:]) for im in images]
    jobs = [(i, y, x) for i, (h, w) in enumerate(sizes)
            for y in window_anchors(h, window, stride) for x in window_anchors(w, window, stride)]
    left = Counter(i for i, _, _ in jobs)
    total, count = {}, {}
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        out = forward(torch.stack([images[i][:, y:y + window, x:x + window] for i, y, x in chunk]))
        for (i, y, x), logits in zip(chunk, out):
            if i not in total:
                total[i] = logits.new_zeros((logits.shape[0], *sizes[i]))
                count[i] = logits.new_zeros((1, *sizes[i]))
            total[i][:, y:y + window, x:x + window] += logits
            count[i][:, y:y + window, x:x + window] += 1
            left[i] -= 1
            if left[i] == 0:
                h, w = shapes[i]
                yield total.pop(i).div_(count.pop(i))[:, :h, :w]


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """``image`` resized (bilinear, aspect kept) so that its shorter side is ``size``."""
    width, height = image.size
    scale = size / min(width, height)
    new = (max(size, int(width * scale + 0.5)), max(size, int(height * scale + 0.5)))
    return image if new == image.size else image.resize(new, Image.Resampling.BILINEAR)


def _evaluation_batch(item: Callable[[int], dict], image_processor, window: int | None, lo: int, hi: int) -> dict:
    """Samples ``lo..hi`` for the evaluation: their ``labels`` ((H, W) class maps) and ``pixels``:
    the images resized to the model input, one (B, 3, S, S) tensor (``window`` None: the whole
    image, one forward), else each image normalised at its short side ``window`` (sliding windows).
    The CPU half of the evaluation, a batch's ``load`` (no model in it)."""
    samples = [item(i) for i in range(lo, hi)]
    labels = [torch.from_numpy(np.asarray(s["label"], dtype=np.int64)) for s in samples]
    if window is None:
        pixels = image_processor(images=[s["image"] for s in samples], return_tensors="pt")["pixel_values"]
    else:
        pixels = [normalize(image_processor, [resize_short_side(s["image"], window)])[0] for s in samples]
    return {"labels": labels, "pixels": pixels}


def _window(model: nn.Module) -> int:
    """The model's input side (its encoder's ``image_size``)."""
    size = unwrap(model).config.vision_config.image_size
    return int(size if isinstance(size, int) else size[0])


def check_labels(model: nn.Module, labels: torch.Tensor) -> None:
    n = int(unwrap(model).config.num_labels)
    valid = labels[labels != IGNORE_INDEX]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= n):
        raise DataError(f"label id {int(valid.max())} does not fit the model: it has num_labels={n} (ids 0..{n - 1})")


class SegmentationTask(Task):
    name = "segmentation"
    main_metric = "miou"
    #: training augmentation: "deit" (the papers' recipe: mmseg's pipeline) or "none" (resize only)
    augment = AUGMENT_CHOICES[0]
    settings = ("augment", "eval_mode")
    #: "slide" (Segmenter/mmseg: shorter side to the input size, windows at stride = input size) or
    #: "whole" (the image resized to the input, one forward); logits are scored at the original size
    eval_mode = "slide"
    #: rows from Python: an image and its mask of the model's class ids (255 = ignore), the image's
    #: size; raw only
    row_schema = RowSchema(required=("image", "mask"), aliases={"image": ("img",), "mask": ("annotation", "label")},
                           raw_only="its training crops and its evaluation at each image's own size need the raw "
                                    "image and mask")

    def load_splits(self, data_dir, splits=("train", "val", "test")):
        return {s: ADE20KDataset.from_split(data_dir, s) for s in splits}

    def collator(self, processor, seed: int = 0):
        return SegmentationCollator(processor, augment=self.augment, seed=seed)

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
        labels, host_labels = batch["labels"], host_value(batch, "labels")  # the collated labels: no wait
        check_labels(model, host_labels)
        logits = model(pixel_values=batch["pixel_values"]).logits
        distill.expose("pixels", logits, 1)
        if bool((host_labels == IGNORE_INDEX).all()):
            return logits.sum() * 0.0  # nothing to learn from this batch
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)

    @torch.no_grad()
    def evaluate(self, model, dataset, processor, batch_size: int = 64, accelerator=None):
        self.check_data(model, dataset)
        image_processor = getattr(processor, "image_processor", processor)
        device = next(model.parameters()).device
        n, window = int(unwrap(model).config.num_labels), _window(model)

        def forward(pixels: torch.Tensor) -> torch.Tensor:
            return model(pixel_values=pixels.to(device, non_blocking=True)).logits.float()

        def run(batch: dict) -> torch.Tensor:
            labels = batch["labels"]
            for label in labels:
                check_labels(model, label)
            conf = torch.zeros(n, n, dtype=torch.long)
            if self.eval_mode == "whole":  # the whole image resized to the model input, one forward
                outputs = forward(batch["pixels"])
            else:
                outputs = sliding_window(forward, batch["pixels"], window, window, batch_size)
            for logits, label in zip(outputs, labels):
                logits = F.interpolate(logits[None], size=tuple(label.shape), mode="bilinear", align_corners=False)
                conf += confusion_matrix(logits[0].argmax(0).cpu(), label, n)
            return conf

        whole = self.eval_mode == "whole"
        load = partial(_evaluation_batch, dataset.__getitem__, image_processor, None if whole else window)
        conf = torch.zeros(n, n, dtype=torch.long)
        with evaluating(model):
            for part in map_batches(len(dataset), batch_size, run, accelerator, load=load):
                conf += part
        return segmentation_metrics(conf)

    def example_inputs(self, model, processor, dataset, batch_size: int = 1):
        batch = SegmentationCollator(processor)([dataset[i % len(dataset)] for i in range(batch_size)])
        return {"pixel_values": batch["pixel_values"].to(next(model.parameters()).device)}


__all__ = ["SegmentationTask", "confusion_matrix", "resize_short_side", "segmentation_metrics", "sliding_window",
           "window_anchors"]


register_task(
    name="segmentation", task=SegmentationTask, writer=write_segmentation, checker=check_segmentation,
    check_context=segmentation_context,
    summary="semantic segmentation with the Segmenter; ADE20K layout; mIoU and pixel accuracy",
)
