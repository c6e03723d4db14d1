"""Image captioning with ``BlipForConditionalGeneration``, as BLIP's caption fine-tuning.

Data: the Karpathy caption layout (the retrieval reader, :mod:`upop.data.retrieval`); training
samples are (image, caption) pairs, as BLIP's ``coco_karpathy_train``. Loss: the decoder's LM
loss on ``<bos> a picture of <caption> [SEP]``, the prompt's tokens excluded from the targets
(BLIP ``models/blip.py``, ``BLIP_Decoder.forward``). Evaluation: beam search (``caption_beams``
beams, BLIP's 3; 1 = greedy) from the image and the prompt, sequences of :attr:`CaptionTask.min_length`
to :attr:`CaptionTask.max_length` tokens counting the start token and the prompt (BLIP
``configs/caption_coco.yaml``: 5 and 20, the lengths ``generate`` sees), returned without the
prompt; scored with corpus BLEU-4 and CIDEr-D of :mod:`.caption_metrics` against all
references, both x100 as in papers; main metric ``cider``.
"""
from __future__ import annotations

import torch
from torch import nn

from upop.data.check import check_retrieval
from upop.data.shapes_vl import write_caption
from upop.data.retrieval import RetrievalCollator, processor_parts
from upop.data.user_rows import RowSchema
from upop.distill import distiller as distill
from upop.tasks._blip import decoder_inputs, generate_texts
from upop.tasks._shard import collated, evaluating, map_batches
from upop.tasks.base import Task
from upop.tasks.registry import register_task
from upop.tasks.caption_metrics import bleu, cider_d
from upop.tasks.retrieval import RetrievalTask


class CaptionTask(Task):
    name = "caption"
    main_metric = "cider"
    settings = ("caption_beams",)
    #: beams of the decoding (BLIP: 3; 1 = greedy)
    caption_beams: int = 3
    #: BLIP's prompt, prepended to every caption in training and generation
    prompt = "a picture of "
    #: generated sequence length bounds, start token and prompt included (BLIP: 5 and 20)
    min_length, max_length = 5, 20
    #: rows from Python: an image and its caption(s), as retrieval's; raw text only (the prompt
    #: goes before each caption's text)
    row_schema = RowSchema(required=("image", "caption"), layout="image_captions",
                           aliases={"image": ("img",), "caption": ("captions", "text")},
                           raw_only="it puts its prompt before each caption's text")

    # the caption data is the retrieval data (Karpathy JSON): same reader
    load_splits = RetrievalTask.load_splits

    def collator(self, processor, seed: int = 0):
        return RetrievalCollator(processor, seed=seed, padding="longest", prompt=self.prompt)

    def _inputs(self, model, batch) -> dict:
        ids, labels = decoder_inputs(batch["input_ids"], batch["attention_mask"], model)
        if "prompt_length" in batch:  # BLIP: no loss on the start token and the prompt
            positions = torch.arange(ids.shape[1], device=ids.device)
            labels = labels.masked_fill(positions < batch["prompt_length"].to(ids.device).view(-1, 1), -100)
        return {"pixel_values": batch["pixel_values"], "input_ids": ids, "attention_mask": batch["attention_mask"],
                "labels": labels}

    def loss(self, model: nn.Module, batch):
        inputs = self._inputs(model, batch)
        out = model(**inputs)
        distill.expose("tokens", out.logits, -1, distill.next_token_mask(inputs["labels"]))
        return out.loss

    @torch.no_grad()
    def predict(self, model, dataset, processor, batch_size: int = 64, accelerator=None) -> list[str]:
        """A generated caption (without the prompt) for every image of ``dataset``, in order."""
        collate = self.collator(processor)
        _, tokenizer = processor_parts(processor)
        device = next(model.parameters()).device
        prompt_ids = tokenizer([self.prompt], return_tensors="pt")["input_ids"].to(device)

        def run(images: torch.Tensor) -> list[str]:
            pixels = images.to(device, non_blocking=True)
            prompt = prompt_ids.repeat(len(pixels), 1)  # the prompt of every image
            # BlipForConditionalGeneration.generate drops the prompt's end token: the sequences
            # start with the start token and the prompt words, which are cut before decoding
            return generate_texts(model, tokenizer, None, pixel_values=pixels, input_ids=prompt,
                                  num_beams=self.caption_beams, min_length=self.min_length,
                                  max_length=self.max_length, skip_tokens=prompt.shape[1] - 1)

        load = collated(collate.encode_images, dataset.__getitem__)  # the images decoded and processed
        with evaluating(model):
            parts = map_batches(len(dataset), batch_size, run, accelerator, load=load)
        return [text for part in parts for text in part]

    def evaluate(self, model, dataset, processor, batch_size: int = 64, accelerator=None):
        hyps = self.predict(model, dataset, processor, batch_size, accelerator)
        refs = [item.captions for item in dataset.items]
        return {"bleu4": 100.0 * bleu(hyps, refs)[3], "cider": 100.0 * cider_d(hyps, refs)}

    def example_inputs(self, model, processor, dataset, batch_size: int = 1):
        batch = self.collator(processor)([dataset[i % len(dataset)] for i in range(batch_size)])
        device = next(model.parameters()).device
        return {k: v.to(device) for k, v in self._inputs(model, batch).items() if k != "labels"}

    def text_tokens(self, processor, dataset) -> int | None:
        """Padded length of prompt + caption over a sample of the data (what the decoder sees)."""
        n = min(len(dataset.items), 64)
        collate = self.collator(processor)
        texts = [self.prompt + c for i in range(n) for c in dataset.items[i].captions]
        return int(collate.encode_texts(texts)["input_ids"].shape[1])


register_task(  # the caption data is the retrieval data (Karpathy JSON): same checker
    name="caption", task=CaptionTask, writer=write_caption, checker=check_retrieval,
    summary="image captioning with BLIP; Karpathy JSON; BLEU-4 and CIDEr",
)
