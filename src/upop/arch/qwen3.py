"""Qwen3 decoder LLMs (``Qwen3ForCausalLM``, ``Qwen3Model``): Llama's block (the sites, units and
hooks are the decoder families' own, :mod:`upop.arch._rope`; see :mod:`upop.arch.llama`) with an
RMSNorm over ``head_dim`` on the queries and on the keys (``q_norm``, ``k_norm``) before RoPE, and a
``head_dim`` of its own in the config (not ``hidden_size / heads``).

Attention units are rotary pairs, as for Llama, and the masks multiply the outputs of Q, K and V, so
in the masked model a dropped pair's query and key channels are 0 when they reach ``q_norm`` and
``k_norm``, which still divide by the dense ``head_dim``. When pairs are pruned the two norms keep
the kept channels of their weight (in the pruned head's order) and their dense divisor, folded
into their weight and epsilon so that they stay transformers' ``Qwen3RMSNorm``
(:class:`~upop.arch._rope.HeadNormsAttention` says how). Whole heads leave the norms as they are.
"""

from __future__ import annotations

from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

from upop.arch.registry import register_family
from upop.arch._rope import HeadNormsAttention, RopePairsAttention, decoder_family, tiny_decoder_config


class RopePairsQwen3Attention(HeadNormsAttention, RopePairsAttention, Qwen3Attention):
    """``Qwen3Attention`` after its rotary pairs were pruned (see :class:`RopePairsAttention`), its
    ``q_norm`` / ``k_norm`` narrowed with them (see :class:`HeadNormsAttention`)."""


def _tiny_config(config_class, widths, vocab):
    """The tiny decoder config with ``head_dim = hidden / heads`` (Qwen3's default is 128)."""
    return tiny_decoder_config(config_class, widths, vocab, head_dim=widths[0] // widths[2])


FAMILY = register_family(decoder_family("qwen3", "Qwen3", Qwen3Attention, RopePairsQwen3Attention,
                                        tiny_config=_tiny_config))
SPEC = FAMILY.spec
