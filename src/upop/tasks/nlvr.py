"""NLVR2 (two images, one statement, true/false) with :class:`upop.models.blip_nlvr.BlipForNLVR`.

Loss: cross-entropy of the two-class head. Evaluation: ``accuracy`` in percent (main metric).
"""
from __future__ import annotations

import torch
from torch import nn

from upop.distill import distiller as distill
from upop.data.check import check_nlvr
from upop.data.shapes_vl import write_nlvr
from upop.data.nlvr import NLVRCollator, NLVRDataset, load_nlvr_split
from upop.data.user_rows import RowSchema
from upop.tasks._shard import collated, evaluating, map_batches, on_device
from upop.tasks.base import Task
from upop.tasks.registry import register_task


class NLVRTask(Task):
    name = "nlvr"
    main_metric = "accuracy"
    #: rows from Python: two images (one field holding the pair, or one field each), a statement
    #: and whether it is true; raw only
    row_schema = RowSchema(required=("images", "sentence", "label"), optional=(), layout="image_pairs",
                           parts={"images": ("image0", "image1")},
                           aliases={"image0": ("left_image",), "image1": ("right_image",), "sentence": ("text",)},
                           raw_only="pixel_values holds one image per row, and a statement is about two")

    def load_splits(self, data_dir, splits=("train", "val", "test"), image_root=None):
        return {s: NLVRDataset(load_nlvr_split(data_dir, s, image_root)) for s in splits}

    def collator(self, processor, seed: int = 0):
        return NLVRCollator(processor)

    def loss(self, model: nn.Module, batch):
        out = model(**batch)
        distill.expose("logits", out.logits)
        return out.loss

    @torch.no_grad()
    def evaluate(self, model, dataset, processor, batch_size: int = 64, accelerator=None):
        load = collated(self.collator(processor), dataset.__getitem__)
        device = next(model.parameters()).device

        def run(batch: dict) -> int:
            batch = on_device(batch, device)
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            return int((logits.argmax(dim=-1) == batch["labels"]).sum())

        with evaluating(model):
            correct = sum(map_batches(len(dataset), batch_size, run, accelerator, load=load))
        return {"accuracy": 100.0 * correct / len(dataset)}

    def example_inputs(self, model, processor, dataset, batch_size: int = 1):
        batch = self.collator(processor)([dataset[i % len(dataset)] for i in range(batch_size)])
        device = next(model.parameters()).device
        return {k: v.to(device) for k, v in batch.items() if k != "labels"}

    def text_tokens(self, processor, dataset) -> int | None:
        n = min(len(dataset), 64)
        enc = self.collator(processor).tokenizer([dataset.items[i].sentence for i in range(n)], padding="longest")
        return len(enc["input_ids"][0])


register_task(
    name="nlvr", task=NLVRTask, writer=write_nlvr, checker=check_nlvr,
    summary="is a statement about two images true, with BLIP; NLVR2 JSON; accuracy",
)
