"""VQA with ``BlipForQuestionAnswering``: answer generation.

Loss: the text decoder's LM loss on one annotator answer per question (drawn by frequency,
different each epoch), given the question encoded with cross-attention into the image — what
``BlipForQuestionAnswering.forward(labels=...)`` computes. Decoder sequences are ``<bos> answer
[SEP]`` because the HF class starts from ``text_config.bos_token_id`` and stops at
``text_config.sep_token_id``.

Evaluation: greedy generation (at most ``max_answer_tokens`` tokens), answers decoded without
special tokens, scored with the official averaged VQA accuracy (:mod:`.vqa_metrics`); metric
``vqa_acc`` in percent.
"""
from __future__ import annotations

import torch
from torch import nn

from ..data.retrieval import _parts
from ..data.vqa import VQACollator, VQADataset, load_vqa_split
from ._blip import decoder_inputs, generate_texts
from ._shard import evaluating, map_batches
from .base import Task
from .vqa_metrics import vqa_accuracy


class VQATask(Task):
    name = "vqa"
    model_classes = ("BlipForQuestionAnswering",)
    main_metric = "vqa_acc"
    max_answer_tokens = 5

    def load_splits(self, data_dir, splits=("train", "val", "test"), image_root=None):
        return {s: VQADataset(load_vqa_split(data_dir, s, image_root)) for s in splits}

    def collator(self, processor, seed: int = 0):
        return VQACollator(processor, seed=seed)

    def loss(self, model: nn.Module, batch):
        inputs = self._inputs(model, batch)
        labels = inputs["decoder_input_ids"].masked_fill(batch["answer_mask"] == 0, -100)
        return model(**inputs, labels=labels).loss

    @staticmethod
    def _inputs(model, batch) -> dict:
        dec, _ = decoder_inputs(batch["answer_ids"], batch["answer_mask"], model)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "pixel_values": batch["pixel_values"], "decoder_input_ids": dec,
                "decoder_attention_mask": batch["answer_mask"]}

    @torch.no_grad()
    def predict(self, model, dataset, processor, batch_size: int = 64, accelerator=None) -> list[str]:
        """Generated answers for every question of ``dataset``, in order."""
        collate = self.collator(processor)
        _, tokenizer = _parts(processor)
        device = next(model.parameters()).device
        # HF generate() lets the decoder attend to every question position (padding too), so
        # questions are batched by token length: no padding, same answers as one at a time
        lengths = [len(tokenizer(it.question)["input_ids"]) for it in dataset.items]
        order = sorted(range(len(dataset)), key=lambda i: (lengths[i], i))
        groups: list[list[int]] = []
        for i in order:
            if groups and len(groups[-1]) < batch_size and lengths[groups[-1][0]] == lengths[i]:
                groups[-1].append(i)
            else:
                groups.append([i])

        def run(lo: int, hi: int) -> list[tuple[int, str]]:
            out = []
            for idx in groups[lo:hi]:
                samples = [dataset[i] for i in idx]
                q = collate.encode_questions(samples)
                texts = generate_texts(model, tokenizer, self.max_answer_tokens,
                                       pixel_values=collate.encode_images(samples).to(device),
                                       input_ids=q["input_ids"].to(device),
                                       attention_mask=q["attention_mask"].to(device))
                out += list(zip(idx, texts))
            return out

        answers: list[str] = [""] * len(dataset)
        with evaluating(model):
            parts = map_batches(len(groups), 1, run, accelerator)
        for part in parts:
            for i, text in part:
                answers[i] = text
        return answers

    def evaluate(self, model, dataset, processor, batch_size: int = 64, accelerator=None):
        preds = self.predict(model, dataset, processor, batch_size, accelerator)
        accs = [vqa_accuracy(p, dataset.items[i].answers) for i, p in enumerate(preds)]
        return {"vqa_acc": 100.0 * sum(accs) / len(accs)}

    def example_inputs(self, model, processor, dataset, batch_size: int = 1):
        batch = self.collator(processor)([dataset[i % len(dataset)] for i in range(batch_size)])
        device = next(model.parameters()).device
        return {k: v.to(device) for k, v in self._inputs(model, batch).items()}

    def text_tokens(self, processor, dataset) -> int | None:
        n = min(len(dataset), 64)
        return int(self.collator(processor).encode_questions([dataset[i] for i in range(n)])["input_ids"].shape[1])

