"""VQA with ``BlipForQuestionAnswering``: answer ranking (BLIP's VQAv2 protocol) or generation.

Loss: the text decoder's LM loss on one annotator answer per question (drawn by frequency,
different each epoch), given the question encoded with cross-attention into the image — what
``BlipForQuestionAnswering.forward(labels=...)`` computes. Decoder sequences are ``<bos> answer
[SEP]`` because the HF class starts from ``text_config.bos_token_id`` and stops at
``text_config.sep_token_id``. (transformers 5.x drops the question mask in the decoder's
cross-attention, so in a batch the padded question positions are attended too; evaluation
batches equal-length questions and has no padding.)

Evaluation (setting ``vqa_inference``), scored with the official VQAv2 accuracy
(:mod:`.vqa_metrics`); metric ``vqa_acc`` in percent:

* ``rank`` (default, BLIP's): each question picks one answer of a candidate list, the best
  decoder log-likelihood among the ``vqa_k`` candidates with the likeliest first token
  (:mod:`.vqa_rank`). Candidates: the file ``answer_list`` if set, else ``answer_list.json`` in
  the data folder, else the distinct answers of the training split, most frequent first
  (resolved by :meth:`VQATask.load_splits`, kept on each dataset as ``candidates``).
* ``generate``: greedy generation (at most ``max_answer_tokens`` tokens), decoded without
  special tokens.
* ``auto``: ``rank`` for BLIP, ``generate`` for a chat model.

A chat-template vision-language model (a class the registry declares ``chat``: LLaVA...) is
trained and evaluated by :mod:`.vlm_chat` (the same data; prompts of the processor's chat
template, loss on the answer tokens, generation); ``rank`` does not apply to it and is refused.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn

from upop.data.check import check_vqa
from upop.data.shapes_vl import write_vqa
from upop.data.retrieval import processor_parts
from upop.data.user_rows import RowSchema
from upop.data.vqa import (ANSWER_LIST, VQACollator, VQADataset, frequent_answers, load_answer_list,
                        load_vqa_split)
from upop.errors import ConfigError, DataError, show
from upop.distill import distiller as distill
from upop.tasks import vlm_chat
from upop.tasks._blip import decoder_inputs, encoder_ids, generate_texts, unwrap
from upop.tasks._shard import evaluating, map_batches, on_device
from upop.tasks.base import Task
from upop.tasks.registry import register_task
from upop.tasks.vqa_metrics import vqa_accuracy
from upop.tasks.vqa_rank import encode_candidates, question_states, rank_answers


def row_candidates(task: "VQATask", splits: dict) -> None:
    """Rows from Python (``RowSchema.finish``): without an ``answer_list`` setting, rank inference
    chooses among the training split's candidates, else its distinct answers, most frequent first
    (as for a data folder without ``answer_list.json``); a split with candidates keeps them."""
    train = splits.get("train")
    if task.answer_list is not None or train is None:
        return
    candidates = getattr(train, "candidates", None) or frequent_answers(train.items)
    for dataset in splits.values():
        if dataset is not None and getattr(dataset, "candidates", None) is None:
            dataset.candidates = candidates


def _question_batches(item, collate: VQACollator, groups: list[list[int]], lo: int, hi: int) -> list[dict]:
    """The evaluation's CPU half for groups ``lo..hi`` (a batch's ``load``; no model in it): each
    group's questions ``index`` (dataset positions) with their ``pixel_values``, ``input_ids`` and
    ``attention_mask``."""
    out = []
    for idx in groups[lo:hi]:
        samples = [item(i) for i in idx]
        out.append({"index": list(idx), "pixel_values": collate.encode_images(samples),
                    **collate.encode_questions(samples)})
    return out


class VQATask(Task):
    name = "vqa"
    main_metric = "vqa_acc"
    max_answer_tokens = 5
    settings = ("vqa_inference", "vqa_k", "answer_list")
    vqa_inference = "auto"
    vqa_k = 128
    answer_list = None
    #: rows from Python: an image, a question and its answer(s) (one text, a list, or VQAv2's list
    #: of {"answer": ...}); raw text only
    row_schema = RowSchema(required=("image", "question", "answers"), optional=("question_id",),
                           aliases={"image": ("img",), "answers": ("answer",)}, layout="questions",
                           raw_only="it draws one annotator's answer text each epoch and ranks answer texts",
                           finish=row_candidates)

    #: whether the model :meth:`check_model` was given is a chat model (:mod:`.vlm_chat`): what the
    #: methods without a model (the collator, the text length) serve
    chat = False

    def check_model(self, model: nn.Module) -> None:
        super().check_model(model)
        self.chat = vlm_chat.is_chat(model)
        self._mode(model)

    def load_splits(self, data_dir, splits=("train", "val", "test"), image_root=None):
        """The splits; in rank mode each dataset also gets the candidate answers (see the module doc)."""
        out = {s: VQADataset(load_vqa_split(data_dir, s, image_root)) for s in splits}
        if self._mode() == "rank":
            candidates = self._candidates(data_dir, out, image_root)
            for dataset in out.values():
                dataset.candidates = candidates
        return out

    def _mode(self, model: nn.Module | None = None) -> str:
        """``rank`` or ``generate``: the setting, ``auto`` decided for the model (given, else the one
        :meth:`check_model` saw); ``rank`` with a chat model is refused."""
        if self.vqa_inference not in ("auto", "rank", "generate"):
            raise ConfigError(f"vqa_inference={show(self.vqa_inference)} is not allowed; choose auto, rank or generate")
        chat = self.chat if model is None else vlm_chat.is_chat(model)
        if chat and self.vqa_inference == "rank":
            name = type(unwrap(model)).__name__ if model is not None else "a chat model"
            raise ConfigError(f"vqa_inference=rank does not apply to {name} (a chat-template model answers by "
                              "generation); use vqa_inference=generate")
        if self.vqa_inference == "auto":
            return "generate" if chat else "rank"
        return self.vqa_inference

    def _candidates(self, data_dir, splits: dict, image_root=None) -> list[str]:
        if self.answer_list is not None:
            return load_answer_list(self.answer_list)
        default = Path(data_dir) / ANSWER_LIST
        if default.exists():
            return load_answer_list(default)
        if "train" in splits:
            return frequent_answers(splits["train"].items)
        try:
            items = load_vqa_split(data_dir, "train", image_root, problems=[])
        except DataError as exc:
            raise DataError(f"VQA rank inference needs candidate answers: no answer_list setting, no {ANSWER_LIST} in "
                            f"{show(data_dir)}, and its training split cannot be read ({exc}); give an answer list "
                            "or use vqa_inference=generate") from None
        return frequent_answers(items)

    def collator(self, processor, seed: int = 0):
        if self.chat:
            return vlm_chat.ChatVQACollator(processor, seed=seed)
        return VQACollator(processor, seed=seed)

    def loss(self, model: nn.Module, batch):
        if vlm_chat.is_chat(model):
            return vlm_chat.loss(model, batch)
        inputs = self._inputs(model, batch)
        labels = inputs["decoder_input_ids"].masked_fill(batch["answer_mask"] == 0, -100)
        with distill.expose_output(unwrap(model).text_decoder, "tokens", distill.next_token_mask(labels)):
            return model(**inputs, labels=labels).loss

    @staticmethod
    def _inputs(model, batch) -> dict:
        dec, _ = decoder_inputs(batch["answer_ids"], batch["answer_mask"], model)
        return {"input_ids": encoder_ids(model, batch["input_ids"]), "attention_mask": batch["attention_mask"],
                "pixel_values": batch["pixel_values"], "decoder_input_ids": dec,
                "decoder_attention_mask": batch["answer_mask"]}

    def predict(self, model, dataset, processor, batch_size: int = 64, accelerator=None) -> list[str]:
        """The answer to every question of ``dataset``, in order (ranked or generated: ``vqa_inference``)."""
        mode = self._mode(model)
        if vlm_chat.is_chat(model):
            return vlm_chat.predict(model, dataset, processor, self.max_answer_tokens, batch_size, accelerator)
        if mode == "rank":
            return self._rank(model, dataset, processor, batch_size, accelerator)
        return self._generate(model, dataset, processor, batch_size, accelerator)

    @torch.no_grad()
    def _rank(self, model, dataset, processor, batch_size: int, accelerator) -> list[str]:
        candidates = getattr(dataset, "candidates", None)
        if candidates is None and self.answer_list is not None:
            candidates = dataset.candidates = load_answer_list(self.answer_list)
        if not candidates:
            raise ConfigError("VQA rank inference needs candidate answers: load the data with the task's load_splits "
                              "(vqa_inference=rank), set answer_list, or use vqa_inference=generate")
        m = unwrap(model)
        device = next(m.parameters()).device
        cand_ids, cand_mask = (t.to(device) for t in encode_candidates(processor_parts(processor)[1], candidates, m))

        def answer(pixel_values, input_ids, attention_mask) -> list[str]:
            states = question_states(m, pixel_values, input_ids, attention_mask)
            chosen = rank_answers(m, states, attention_mask, cand_ids, cand_mask, self.vqa_k)
            return [candidates[j] for j in chosen.tolist()]

        return self._by_length(model, dataset, processor, batch_size, accelerator, answer)

    @torch.no_grad()
    def _generate(self, model, dataset, processor, batch_size: int, accelerator) -> list[str]:
        tokenizer = processor_parts(processor)[1]

        def answer(pixel_values, input_ids, attention_mask) -> list[str]:
            return generate_texts(model, tokenizer, self.max_answer_tokens, pixel_values=pixel_values,
                                  input_ids=encoder_ids(model, input_ids), attention_mask=attention_mask)

        return self._by_length(model, dataset, processor, batch_size, accelerator, answer)

    def _by_length(self, model, dataset, processor, batch_size: int, accelerator, answer) -> list[str]:
        """``answer(pixel_values, input_ids, attention_mask)`` of every question, in dataset order.

        The decoder of the HF BLIP classes attends to every question position, padding included
        (``generate()`` passes an all-ones mask; in transformers 5.x the text cross-attention drops
        ``encoder_attention_mask``), so questions are batched only with others of the same token
        length: no padding, the same answers as one question at a time.
        """
        collate = self.collator(processor)
        _, tokenizer = processor_parts(processor)
        device = next(model.parameters()).device
        lengths = [len(tokenizer(it.question)["input_ids"]) for it in dataset.items]
        order = sorted(range(len(dataset)), key=lambda i: (lengths[i], i))
        groups: list[list[int]] = []
        for i in order:
            if groups and len(groups[-1]) < batch_size and lengths[groups[-1][0]] == lengths[i]:
                groups[-1].append(i)
            else:
                groups.append([i])

        def run(batches: list[dict]) -> list[tuple[int, str]]:
            out = []
            for batch in batches:
                inputs = on_device(batch, device)
                texts = answer(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
                out += list(zip(batch["index"], texts))
            return out

        load = partial(_question_batches, dataset.__getitem__, collate, groups)
        answers: list[str] = [""] * len(dataset)
        with evaluating(model):
            parts = map_batches(len(groups), 1, run, accelerator, load=load)
        for part in parts:
            for i, text in part:
                answers[i] = text
        return answers

    def evaluate(self, model, dataset, processor, batch_size: int = 64, accelerator=None):
        preds = self.predict(model, dataset, processor, batch_size, accelerator)
        accs = [vqa_accuracy(p, dataset.items[i].answers) for i, p in enumerate(preds)]
        return {"vqa_acc": 100.0 * sum(accs) / len(accs)}

    def example_inputs(self, model, processor, dataset, batch_size: int = 1):
        if vlm_chat.is_chat(model):
            return vlm_chat.example_inputs(model, processor, dataset, batch_size)
        batch = self.collator(processor)([dataset[i % len(dataset)] for i in range(batch_size)])
        device = next(model.parameters()).device
        return {k: v.to(device) for k, v in self._inputs(model, batch).items()}

    def text_tokens(self, processor, dataset) -> int | None:
        if self.chat:
            return vlm_chat.text_tokens(processor, dataset)
        n = min(len(dataset), 64)
        return int(self.collator(processor).encode_questions([dataset[i] for i in range(n)])["input_ids"].shape[1])


register_task(
    name="vqa", task=VQATask, writer=write_vqa, checker=check_vqa,
    summary="visual question answering with BLIP or a chat VLM (LLaVA); VQAv2 JSON; VQA accuracy",
)
