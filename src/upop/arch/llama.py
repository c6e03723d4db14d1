"""Llama-style decoder LLMs (``LlamaForCausalLM``, ``LlamaModel``).

A decoder block has grouped-query attention with rotary position embeddings and a gated MLP
(the sites and hooks shared by the decoder families are in :mod:`upop.arch._rope`):

- attention units are rotary pairs of head channels (channel ``u`` with ``u + head_dim / 2``, which
  RoPE rotates together), shared by every query and key/value head (``--granularity head-dim``, the
  paper's unit), or whole key/value heads with their query heads (``--granularity head``), or both
  ranked together with exact bilinear costs (``both``).
- after pruning, the attention's class becomes :class:`RopePairsLlamaAttention`: the same module
  whose forward gives the kept channels the cos/sin of their dense pairs (``rope_pairs``), so every
  kept pair turns at its original frequency. The model's rotary embedding is untouched (it is shared
  by the layers, which keep different pairs); the attention keeps its stored dense scale (``scaling``).
- MLP units are gated neurons: a row of ``gate_proj`` and ``up_proj`` and a column of
  ``down_proj``; the mask multiplies ``up_proj``'s output (``act(gate) * up * mask``).
- RMSNorm, the embeddings and the LM head (tied or not) are not pruned; the KV cache of
  ``generate`` takes each layer's own width.
"""

from __future__ import annotations

from transformers.models.llama.modeling_llama import LlamaAttention

from upop.arch.registry import register_family
from upop.arch._rope import RopePairsAttention, decoder_family


class RopePairsLlamaAttention(RopePairsAttention, LlamaAttention):
    """``LlamaAttention`` after its rotary pairs were pruned (see :class:`RopePairsAttention`)."""


FAMILY = register_family(decoder_family("llama", "Llama", LlamaAttention, RopePairsLlamaAttention))
SPEC = FAMILY.spec
