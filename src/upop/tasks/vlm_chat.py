"""VQA with a chat-template vision-language model (LLaVA...: a class the registry declares
``chat``, :class:`upop.arch.registry.ModelClass`): the half of the ``vqa`` task
(:mod:`upop.tasks.vqa`) that trains and evaluates it.

Data: the VQA folders and reader of the BLIP task (:mod:`upop.data.vqa`): items of an image, a
question and the annotators' answers; the training answer is drawn by frequency, another each
epoch (:func:`upop.data.vqa.draw_answer`).

Prompt: the processor's chat template (``processor.apply_chat_template``) of one user turn (the
image, then the question) and, in training, one assistant turn (the answer). The prompt is the
user turn with the template's generation prompt; the answer's tokens are what the full
conversation's tokens add after the prompt's (both tokenized as one text each, so a merge across
the boundary is seen; a template whose full text does not start with its prompt is refused). The
processor expands the image token of the prompt into the image's tokens; the tokenizer's own
special tokens are added unless the template's text starts with the BOS token itself (as
transformers' ``apply_chat_template(tokenize=True)`` does).

Loss: the next-token cross-entropy on the answer tokens only (the template's end of turn
included, so the model learns to stop): the labels are -100 on the prompt, its image tokens and
the padding (right padding). Only the logits from the shortest prompt's last token on are
computed (``logits_to_keep``, read on the host from the collated batch: no wait for the device);
they are exposed for run-level distillation.

Evaluation: greedy generation of at most ``max_answer_tokens`` new tokens from the left-padded
prompts (batches through :func:`upop.tasks._shard.map_batches`, loaded in its DataLoader workers
and split across the processes of a run); the answer is the new tokens before the first special
token (the end of turn), decoded, whitespace runs collapsed; scored with the official VQA accuracy
(:mod:`upop.tasks.vqa_metrics`), metric ``vqa_acc`` in percent.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from upop.arch.registry import model_class_info
from upop.data.vqa import draw_answer
from upop.distill import distiller as distill
from upop.errors import ConfigError, show
from upop.measure.host_sync import host_value
from upop.tasks._shard import collated, evaluating, map_batches, on_device
from upop.tasks.base import unwrap
from upop.tasks.vqa_metrics import vqa_accuracy

#: the label of a position that carries no loss, as in transformers
IGNORE = -100
#: keys of a collated batch that are not the model's image inputs
_TEXT_KEYS = ("input_ids", "attention_mask", "labels", "prompt_lengths", "index")


def is_chat(model: nn.Module) -> bool:
    """Whether ``model``'s class is registered as a chat-template vision-language model."""
    info = model_class_info(type(unwrap(model)).__name__)
    return bool(info is not None and info.chat)


def check_processor(processor) -> None:
    """Refuse a processor that cannot build the chat prompts (no chat template, or no tokenizer)."""
    if getattr(processor, "tokenizer", None) is None or not callable(getattr(processor, "apply_chat_template", None)):
        raise ConfigError(f"task 'vqa' with a chat model needs a multimodal processor (a tokenizer, an image processor "
                          f"and a chat template, as LlavaProcessor); got a {type(processor).__name__}")
    if not getattr(processor, "chat_template", None):
        raise ConfigError(f"task 'vqa' with a chat model builds its prompts with the processor's chat template; the "
                          f"{type(processor).__name__} has none (save one with the processor: "
                          "processor.chat_template = '...', as the model's Hub folder has it)")


def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def _pad(rows: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` padded to the longest, on the left or the right: (ids, attention mask), long."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


class ChatVQACollator:
    """VQA samples -> chat-template batches (see the module doc). Holds the processor and no model,
    so it pickles to DataLoader workers.

    ``__call__`` (training): ``input_ids``, ``attention_mask`` (right-padded prompt + answer),
    ``labels`` (the answer tokens, -100 elsewhere), ``prompt_lengths`` and the processor's image
    inputs (``pixel_values``...). :meth:`prompts` (evaluation): the left-padded prompts, their
    image inputs and the samples' ``index`` (a list).
    """

    def __init__(self, processor, seed: int = 0):
        check_processor(processor)
        self.processor, self.tokenizer = processor, processor.tokenizer
        self.seed, self.epoch = seed, 0
        self.pad_id = _pad_id(self.tokenizer)
        self.stop_ids = frozenset(self.tokenizer.all_special_ids)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @staticmethod
    def conversation(question: str, answer: str | None = None) -> list[dict]:
        """One user turn (the image, then the question) and, with ``answer``, the assistant's reply."""
        turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        if answer is not None:
            turns.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return turns

    def prompt_text(self, question: str) -> str:
        return self.processor.apply_chat_template(self.conversation(question), tokenize=False,
                                                  add_generation_prompt=True)

    def _special(self, text: str) -> bool:
        """Whether the tokenizer adds its special tokens to ``text`` (not where the template wrote BOS)."""
        bos = getattr(self.tokenizer, "bos_token", None)
        return not (bos and text.startswith(bos))

    def _encode_prompts(self, samples) -> tuple[list[str], list[list[int]], dict]:
        """Each sample's prompt text, its token ids with the image tokens expanded, and the image inputs."""
        texts = [self.prompt_text(s["question"]) for s in samples]
        enc = self.processor(text=texts, images=[[s["image"]] for s in samples], padding="longest",
                             return_tensors="pt", add_special_tokens=self._special(texts[0]))
        ids = [row[keep.bool()].tolist() for row, keep in zip(enc["input_ids"], enc["attention_mask"])]
        images = {k: v for k, v in enc.items() if k not in _TEXT_KEYS and torch.is_tensor(v)}
        return texts, ids, images

    def answer_ids(self, prompt: str, question: str, answer: str) -> list[int]:
        """The tokens the assistant turn holding ``answer`` adds after ``prompt`` (its end of turn included)."""
        full = self.processor.apply_chat_template(self.conversation(question, answer), tokenize=False)
        if not full.startswith(prompt):
            raise ConfigError(f"the chat template of the {type(self.processor).__name__} does not start a conversation "
                              f"with its generation prompt ({show(prompt, 80)} is not the start of "
                              f"{show(full, 120)}); need a template whose assistant turn follows the prompt")
        special = self._special(full)
        head = self.tokenizer(prompt, add_special_tokens=special)["input_ids"]
        whole = self.tokenizer(full, add_special_tokens=special)["input_ids"]
        if whole[:len(head)] != head or len(whole) == len(head):
            raise ConfigError(f"the tokens of the chat prompt {show(prompt, 80)} are not the start of the tokens of "
                              f"its conversation with the answer {show(answer, 40)} (the "
                              f"{type(self.tokenizer).__name__} merges across the end of the prompt); need a template "
                              "whose answer starts a new token")
        return list(whole[len(head):])

    def __call__(self, samples) -> dict:
        texts, prompts, images = self._encode_prompts(samples)
        answers = [self.answer_ids(t, s["question"], draw_answer(s, self.seed, self.epoch))
                   for t, s in zip(texts, samples)]
        ids, mask = _pad([p + a for p, a in zip(prompts, answers)], self.pad_id, left=False)
        labels = torch.full_like(ids, IGNORE)
        for i, (p, a) in enumerate(zip(prompts, answers)):
            labels[i, len(p):len(p) + len(a)] = torch.tensor(a, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "prompt_lengths": torch.tensor([len(p) for p in prompts], dtype=torch.long), **images}

    def prompts(self, samples) -> dict:
        _, prompts, images = self._encode_prompts(samples)
        ids, mask = _pad(prompts, self.pad_id, left=True)
        return {"input_ids": ids, "attention_mask": mask, "index": [int(s["index"]) for s in samples], **images}

    def answer_text(self, new_ids: list[int]) -> str:
        """The answer of generated tokens: those before the first special token (the end of turn), decoded."""
        stop = next((j for j, t in enumerate(new_ids) if t in self.stop_ids), len(new_ids))
        return " ".join(self.tokenizer.decode(new_ids[:stop], skip_special_tokens=True).split())


def image_inputs(batch: dict) -> dict:
    """The processor's image inputs of a collated batch (``pixel_values`` and whatever else it gives)."""
    return {k: v for k, v in batch.items() if k not in _TEXT_KEYS}


def _keeps_logits(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(type(unwrap(model)).forward).parameters


def loss(model: nn.Module, batch) -> torch.Tensor:
    """Mean next-token cross-entropy over the answer tokens of the batch (no host read: the prompt
    lengths come from the collated batch)."""
    labels = batch["labels"]
    extra = {}
    if _keeps_logits(model):  # from the shortest prompt's last token on: every answer token is predicted there
        keep = labels.shape[1] - int(host_value(batch, "prompt_lengths").min()) + 1
        labels, extra = labels[:, labels.shape[1] - keep:], {"logits_to_keep": keep}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **image_inputs(batch),
                   **extra).logits
    distill.expose("logits", logits, -1, distill.next_token_mask(labels))
    targets = labels[:, 1:]
    shifted = logits[:, :-1].float()
    nll = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                          reduction="sum")
    return nll / (targets != IGNORE).sum().clamp_min(1)


@torch.no_grad()
def predict(model: nn.Module, dataset, processor, max_answer_tokens: int, batch_size: int = 64,
            accelerator=None) -> list[str]:
    """The generated answer to every question of ``dataset``, in order."""
    collate = ChatVQACollator(processor)
    inner = unwrap(model)
    device = next(inner.parameters()).device

    def run(batch: dict) -> list[tuple[int, str]]:
        inputs = on_device({k: v for k, v in batch.items() if k != "index"}, device)
        out = inner.generate(**inputs, max_new_tokens=max_answer_tokens, do_sample=False, num_beams=1,
                             pad_token_id=collate.pad_id)
        new = out[:, inputs["input_ids"].shape[1]:].tolist()
        return [(i, collate.answer_text(row)) for i, row in zip(batch["index"], new)]

    answers = [""] * len(dataset)
    with evaluating(model):
        parts = map_batches(len(dataset), batch_size, run, accelerator, load=collated(collate.prompts,
                                                                                      dataset.__getitem__))
    for part in parts:
        for i, text in part:
            answers[i] = text
    return answers


def evaluate(model: nn.Module, dataset, processor, max_answer_tokens: int, batch_size: int = 64,
             accelerator=None) -> dict[str, float]:
    preds = predict(model, dataset, processor, max_answer_tokens, batch_size, accelerator)
    accs = [vqa_accuracy(p, dataset.items[i].answers) for i, p in enumerate(preds)]
    return {"vqa_acc": 100.0 * sum(accs) / len(accs)}


def example_inputs(model: nn.Module, processor, dataset, batch_size: int = 1) -> dict[str, torch.Tensor]:
    """A training batch's forward inputs (prompt, image and answer) of real samples."""
    batch = ChatVQACollator(processor)([dataset[i % len(dataset)] for i in range(batch_size)])
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items() if k not in ("labels", "prompt_lengths")}


def text_tokens(processor, dataset) -> int:
    """Text tokens per sample for FLOPs costs: the longest prompt + answer of a sample of the data,
    its image tokens left out (the family counts those itself)."""
    collate = ChatVQACollator(processor)
    batch = collate([dataset[i] for i in range(min(len(dataset), 64))])
    image = getattr(processor, "image_token_id", None)
    real = batch["attention_mask"].sum(1)
    if isinstance(image, int):
        real = real - (batch["input_ids"] == image).sum(1)
    return int(real.max())
