"""Qwen2 decoder LLMs (``Qwen2ForCausalLM``, ``Qwen2Model``): Llama's block with biases on Q, K and V (the
sites, units and hooks are the decoder families' own, :mod:`upop.arch._rope`; see :mod:`upop.arch.llama`)."""

from __future__ import annotations

from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

from upop.arch.registry import register_family
from upop.arch._rope import RopePairsAttention, decoder_family


class RopePairsQwen2Attention(RopePairsAttention, Qwen2Attention):
    """``Qwen2Attention`` after its rotary pairs were pruned (see :class:`RopePairsAttention`)."""


FAMILY = register_family(decoder_family("qwen2", "Qwen2", Qwen2Attention, RopePairsQwen2Attention))
SPEC = FAMILY.spec
