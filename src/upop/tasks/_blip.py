"""Helpers shared by the BLIP tasks: decoder inputs, generation, unwrapping."""
from __future__ import annotations

from typing import Any, Callable

import torch


def unwrap(model):
    """The model under a DistributedDataParallel / accelerate wrapper (or the model itself)."""
    return getattr(model, "module", model)


def through_wrapper(model, fn: Callable[..., Any], *args):
    """``fn(inner_model, *args)``, run as the forward of ``model``'s data-parallel wrapper.

    A loss that calls sub-modules of the model (vision tower, text encoder, heads) must still go
    through the wrapper's forward, or DistributedDataParallel never prepares its gradient
    all-reduce and each process trains its own weights. For the duration of the call the inner
    model's ``forward`` is ``fn``, so ``model(*args)`` runs the wrapper's hooks around it. Without
    a wrapper this is just ``fn(model, *args)``.
    """
    inner = unwrap(model)
    if inner is model:
        return fn(model, *args)
    had = "forward" in inner.__dict__
    saved = inner.__dict__.get("forward")
    inner.forward = lambda *a: fn(inner, *a)
    try:
        return model(*args)
    finally:
        if had:
            inner.forward = saved
        else:
            del inner.forward


def encoder_ids(model, input_ids: torch.Tensor) -> torch.Tensor:
    """``input_ids`` for BLIP's image-grounded text encoder: with ``text_config.enc_token_id`` set
    (the BLIP importers record BLIP's ``[ENC]`` there), its first token is replaced by it, as BLIP
    does for image-text matching and for the VQA question (``models/blip_retrieval.py``,
    ``models/blip_vqa.py``), since BLIP's weights were trained so; without it the ids are used as
    given (transformers' BLIP classes feed ``[CLS]``)."""
    enc = getattr(unwrap(model).config.text_config, "enc_token_id", None)
    if enc is None or input_ids.shape[-1] == 0:
        return input_ids
    ids = input_ids.clone()
    ids[:, 0] = enc
    return ids


def decoder_inputs(ids: torch.Tensor, mask: torch.Tensor, model) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP decoder inputs and LM labels from plain tokenizer output.

    The HF BLIP classes start decoding from ``text_config.bos_token_id`` and stop at
    ``text_config.sep_token_id``, so the first token becomes BOS and the last real token of each
    sequence becomes SEP (for a BERT tokenizer these are ``[CLS]`` -> BOS and ``[SEP]`` kept; for
    the Shapes tokenizer ``<bos>`` kept and ``<eos>`` -> ``[SEP]``). Labels are the ids with
    padding set to -100 (the decoder shifts them itself).
    """
    cfg = unwrap(model).config.text_config
    ids = ids.clone()
    ids[:, 0] = cfg.bos_token_id
    last = mask.sum(dim=1).clamp(min=2) - 1
    ids[torch.arange(ids.shape[0]), last] = cfg.sep_token_id
    return ids, ids.masked_fill(mask == 0, -100)


def generate_texts(model, tokenizer, max_new_tokens: int | None, *, num_beams: int = 1, min_length: int = 0,
                   max_length: int | None = None, skip_tokens: int = 0, **inputs) -> list[str]:
    """Deterministic generation with a BLIP class (greedy, or beam search with ``num_beams``),
    decoded without special tokens.

    Lengths are ``generate``'s: ``max_new_tokens`` new tokens, or (when it is None) sequences of
    ``min_length`` to ``max_length`` tokens, counting any prompt the sequence starts with. The
    first ``skip_tokens`` of each sequence (a prompt) are left out of the text.
    """
    lengths = {"max_new_tokens": max_new_tokens} if max_new_tokens is not None else {"max_length": max_length}
    if min_length:
        lengths["min_length"] = min_length
    ids = model.generate(**inputs, **lengths, do_sample=False, num_beams=num_beams)
    return [" ".join(t.split()) for t in tokenizer.batch_decode(ids[:, skip_tokens:], skip_special_tokens=True)]
