"""Image captioning with ``BlipForConditionalGeneration``.

Data: the Karpathy caption layout (the retrieval reader, :mod:`upop.data.retrieval`).
Loss: the decoder's LM loss on one reference caption per image (a different one each epoch),
as ``<bos> caption [SEP]`` (no prompt). Evaluation: greedy generation from the image alone
(at most ``max_caption_tokens`` new tokens), scored with corpus BLEU-4 and CIDEr-D of
:mod:`.caption_metrics` against all references, both x100 as in papers; main metric ``cider``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..data.retrieval import _parts
from ._blip import decoder_inputs, generate_texts
from ._shard import evaluating, map_batches
from .base import Task
from .caption_metrics import bleu, cider_d
from .retrieval import RetrievalTask


class CaptionTask(Task):
    name = "caption"
    model_classes = ("BlipForConditionalGeneration",)
    main_metric = "cider"
    max_caption_tokens = 24

    # the caption data is the retrieval data (Karpathy JSON): same reader, same collator
    load_splits = RetrievalTask.load_splits
    collator = RetrievalTask.collator

    def _inputs(self, model, batch) -> dict:
        ids, labels = decoder_inputs(batch["input_ids"], batch["attention_mask"], model)
        return {"pixel_values": batch["pixel_values"], "input_ids": ids, "attention_mask": batch["attention_mask"],
                "labels": labels}

    def loss(self, model: nn.Module, batch):
        return model(**self._inputs(model, batch)).loss

    @torch.no_grad()
    def predict(self, model, dataset, processor, batch_size: int = 64, accelerator=None) -> list[str]:
        """A generated caption for every image of ``dataset``, in order."""
        collate = self.collator(processor)
        _, tokenizer = _parts(processor)
        device = next(model.parameters()).device

        def run(lo: int, hi: int) -> list[str]:
            pixels = collate.encode_images([dataset[i] for i in range(lo, hi)]).to(device)
            return generate_texts(model, tokenizer, self.max_caption_tokens, pixel_values=pixels)

        with evaluating(model):
            return [text for part in map_batches(len(dataset), batch_size, run, accelerator) for text in part]

    def evaluate(self, model, dataset, processor, batch_size: int = 64, accelerator=None):
        hyps = self.predict(model, dataset, processor, batch_size, accelerator)
        refs = [item.captions for item in dataset.items]
        return {"bleu4": 100.0 * bleu(hyps, refs)[3], "cider": 100.0 * cider_d(hyps, refs)}

    def example_inputs(self, model, processor, dataset, batch_size: int = 1):
        batch = self.collator(processor)([dataset[i % len(dataset)] for i in range(batch_size)])
        device = next(model.parameters()).device
        return {k: v.to(device) for k, v in self._inputs(model, batch).items() if k != "labels"}

    def text_tokens(self, processor, dataset) -> int | None:
        n = min(len(dataset), 64)
        texts = [c for i in range(n) for c in dataset.items[i].captions]
        return int(self.collator(processor).encode_texts(texts)["input_ids"].shape[1])
