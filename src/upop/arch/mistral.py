"""Mistral decoder LLMs (``MistralForCausalLM``, ``MistralModel``): Llama's block with a sliding-window attention mask (the
sites, units and hooks are the decoder families' own, :mod:`upop.arch._rope`; see :mod:`upop.arch.llama`)."""

from __future__ import annotations

from transformers.models.mistral.modeling_mistral import MistralAttention

from upop.arch.registry import register_family
from upop.arch._rope import RopePairsAttention, decoder_family


class RopePairsMistralAttention(RopePairsAttention, MistralAttention):
    """``MistralAttention`` after its rotary pairs were pruned (see :class:`RopePairsAttention`)."""


FAMILY = register_family(decoder_family("mistral", "Mistral", MistralAttention, RopePairsMistralAttention))
SPEC = FAMILY.spec
