"""Causal language modelling with decoder LLMs (``LlamaForCausalLM``, ...): next-token
cross-entropy; perplexity.

Data: a text corpus, one ``.jsonl`` or ``.txt`` file per split (:mod:`upop.data.text_corpus`).
Each document is tokenized by the processor (a tokenizer) as it tokenizes a text: with the
special tokens it adds itself (a BOS for Llama, none for Qwen2; upop adds none), cut at the block
length (:attr:`LanguageModelingTask.block_length`; by default the smallest of the tokenizer's
``model_max_length``, the model's ``max_position_embeddings`` and 512), right-padded, and scored
on every real token after the first: the ``labels`` are the ``input_ids`` with padding set to
-100, and logit ``i`` predicts label ``i + 1`` (the Hugging Face convention). A document longer
than the block is cut, not split into several blocks.

The loss is the mean next-token cross-entropy over the batch's scored tokens (what the model's
own ``labels=`` loss gives), computed from the logits, which are exposed for run-level
distillation. Evaluation sums the negative log-likelihood and the scored tokens over the whole
split: ``perplexity`` = exp(total NLL / total tokens) (the main metric: lower is better),
``nll`` (the mean, in nats) and ``token_accuracy`` (next-token top-1, percent).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from upop.data.text_corpus import check_lm, load_lm, write_lm
from upop.data.unlabelled import processor_parts
from upop.data.user_rows import RowSchema
from upop.distill import distiller as distill
from upop.errors import ConfigError, DataError, show
from upop.tasks._shard import collated, evaluating, map_batches, on_device
from upop.tasks.base import Task, unwrap
from upop.tasks.registry import register_task

#: the longest block by default (a longer one needs the ``block_length`` setting)
DEFAULT_BLOCK = 512
#: the label of a position that is not scored (padding), as in transformers
IGNORE = -100


def tokenizer_of(processor):
    """The tokenizer of ``processor`` (a tokenizer, or a processor holding one); ConfigError without."""
    tokenizer = processor_parts(processor)[1]
    if tokenizer is None:
        raise ConfigError(f"task 'lm' needs a tokenizer as its processor; got {type(processor).__name__}")
    return tokenizer


def position_limit(model: nn.Module) -> int | None:
    """The model's ``max_position_embeddings`` (its text config's), None where it declares none."""
    config = unwrap(model).config
    config = getattr(config, "text_config", None) or config
    limit = getattr(config, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


def check_block_length(value) -> int | None:
    """``value`` as a block length: None (the default) or an integer >= 2; ConfigError otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ConfigError(f"block_length={show(value)} is not allowed; need an integer >= 2 (tokens per document) "
                          "or None (the default)")
    return value


def block_length(tokenizer, model_limit: int | None = None, setting: int | None = None) -> int:
    """Tokens per document: ``setting`` if given, else the smallest of the tokenizer's
    ``model_max_length`` (where it is a real limit) and :data:`DEFAULT_BLOCK`; never more than the
    model's ``model_limit``."""
    limits = [check_block_length(setting) or DEFAULT_BLOCK]
    declared = getattr(tokenizer, "model_max_length", None)
    if setting is None and isinstance(declared, int) and declared >= 2:
        limits.append(declared)
    if model_limit:
        limits.append(int(model_limit))
    return min(limits)


class LMCollator:
    """Documents -> ``{"input_ids", "attention_mask", "labels"}`` (long, (batch, longest)): tokenized
    by ``tokenizer`` with its special tokens, cut at ``max_length`` tokens, right-padded (with the
    pad token, else the end token, else 0: padding is masked out and never scored), ``labels`` the
    ids with -100 on padding. Holds no model, so it pickles to DataLoader workers."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, int(max_length)

    def _pad_id(self) -> int:
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(self.tokenizer, name, None)
            if isinstance(value, int):
                return value
        return 0

    def token_ids(self, texts: list) -> list[list[int]]:
        """Each text's token ids, cut at :attr:`max_length`."""
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)
        ids = enc["input_ids"]
        if torch.is_tensor(ids):  # Trainer-style rows, stacked by upop's pass-through: their real tokens
            mask = enc["attention_mask"].bool()
            return [row[keep].tolist() for row, keep in zip(ids, mask)]
        return [list(row)[:self.max_length] for row in ids]

    def encode(self, texts: list) -> dict[str, torch.Tensor]:
        rows = self.token_ids(texts)
        width = max([1, *map(len, rows)])
        ids = torch.full((len(rows), width), self._pad_id(), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE)}

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        return self.encode([s["text"] for s in samples])


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(nll, scored)``: the float32 negative log-likelihood of each next token ((batch, length -
    1); 0 where not scored) and where a token is scored (its label is not -100)."""
    targets = labels[:, 1:].to(logits.device)
    shifted = logits[:, :-1].float()
    nll = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                          reduction="none").view_as(targets)
    return nll, targets != IGNORE


class LanguageModelingTask(Task):
    name = "lm"
    main_metric = "perplexity"
    higher_is_better = False
    #: tokens per document: None is the smallest of the tokenizer's ``model_max_length``, the
    #: model's ``max_position_embeddings`` and 512; a number overrides the first and the last
    #: (never the model's limit). The ``block_length`` setting (:class:`~upop.config.UPopConfig`,
    #: ``--block-length``), read by :meth:`configure`.
    block_length: int | None = None
    settings = ("block_length",)
    #: rows from Python: one document per row; or Trainer-style input_ids (cut at the block)
    row_schema = RowSchema(required=("text",), optional=(), layout="unlabelled",
                           trainer=("input_ids",), trainer_optional=("attention_mask",))

    def __init__(self):
        self._model_limit: int | None = None

    def configure(self, config) -> "LanguageModelingTask":
        check_block_length(config.block_length)  # a config-like object may hold any value: refused before it is set
        return super().configure(config)

    def check_model(self, model: nn.Module) -> None:
        """The model must be a class the task serves; its position limit is noted for the collator."""
        super().check_model(model)
        self._model_limit = position_limit(model)

    def load_splits(self, data_dir, splits=("train", "val", "test")):
        return load_lm(data_dir, splits)

    def _collate(self, processor, model: nn.Module | None = None) -> LMCollator:
        tokenizer = tokenizer_of(processor)
        limit = position_limit(model) if model is not None else self._model_limit
        return LMCollator(tokenizer, block_length(tokenizer, limit, self.block_length))

    def collator(self, processor, seed: int = 0):
        return self._collate(processor)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        """Mean next-token cross-entropy over the batch's scored tokens (no host read)."""
        labels = batch["labels"]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        distill.expose("logits", logits, -1, distill.next_token_mask(labels))
        nll, scored = token_nll(logits, labels)
        return nll.sum() / scored.sum().clamp_min(1)

    @torch.no_grad()
    def evaluate(self, model, dataset, processor, batch_size: int = 64, accelerator=None):
        load = collated(self._collate(processor, model), dataset.__getitem__)
        device = next(model.parameters()).device

        def run(batch: dict) -> torch.Tensor:
            batch = on_device(batch, device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            nll, scored = token_nll(logits, batch["labels"])
            hits = (logits[:, :-1].argmax(-1) == batch["labels"][:, 1:]) & scored
            return torch.stack([nll.double().sum(), scored.sum().double(), hits.sum().double()]).cpu()

        with evaluating(model):
            parts = map_batches(len(dataset), batch_size, run, accelerator, load=load)
        nll, tokens, hits = (torch.stack(parts).sum(0) if parts else torch.zeros(3, dtype=torch.float64)).tolist()
        if tokens == 0:
            split = show(getattr(dataset, "split", "") or "dataset")
            raise DataError(f"the {split} split has no token to predict: every document is shorter than two tokens "
                            "(need documents of at least two tokens after tokenization)")
        mean = nll / tokens
        return {"perplexity": math.exp(mean) if mean < 700 else math.inf, "nll": mean,
                "token_accuracy": 100.0 * hits / tokens}

    def example_inputs(self, model, processor, dataset, batch_size: int = 1):
        batch = self._collate(processor, model)([dataset[i % len(dataset)] for i in range(batch_size)])
        device = next(model.parameters()).device
        return {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}

    def text_tokens(self, processor, dataset) -> int | None:
        """The block length (tokens per document), what FLOPs costs count per text."""
        return self._collate(processor).max_length


register_task(
    name="lm", task=LanguageModelingTask, writer=write_lm, checker=check_lm,
    summary="causal language modelling with decoder LLMs (Llama, ...); a .jsonl or .txt per split; perplexity",
)
