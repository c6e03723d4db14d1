"""Qwen2 decoder LLMs (``Qwen2ForCausalLM``, ``Qwen2Model``): Llama's block with biases on Q, K and V (the
sites, units and hooks are the decoder families' own, :mod:`upop.arch._rope`; see :mod:`upop.arch.llama`)."""

from __future__ import annotations

import transformers
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

from upop.arch.registry import Family, ModelClass, TinyModel, register_family
from upop.arch._rope import (ATTENTION, GATED_MLP, RopePairsAttention, check_rope, rope_swap, set_decoder_head_dim,
                             set_decoder_heads, shapes_tokenizer, tiny_decoder_config)
from upop.arch._spec import ArchSpec, Tower


class RopePairsQwen2Attention(RopePairsAttention, Qwen2Attention):
    """``Qwen2Attention`` after its rotary pairs were pruned (see :class:`RopePairsAttention`)."""


SPEC = ArchSpec(
    name="qwen2",
    model_types=("qwen2",),
    towers=(Tower(("model.layers", "layers"), "text", (ATTENTION,), GATED_MLP),),
    set_head_dim=set_decoder_head_dim,
    set_num_heads=set_decoder_heads,
    swap_class=rope_swap(Qwen2Attention, RopePairsQwen2Attention),
    check=check_rope,
)

FAMILY = register_family(Family(
    spec=SPEC,
    classes=(
        ModelClass("Qwen2ForCausalLM", tasks=("lm", "distill"), reads=("text",)),
        ModelClass("Qwen2Model", reads=("text",)),  # loads and prunes; no task reads a bare decoder
    ),
    tiny=(TinyModel("qwen2", "Qwen2ForCausalLM", processor=shapes_tokenizer, data_task="lm",
                    build=lambda widths, vocab, image_size, num_labels: transformers.Qwen2ForCausalLM(
                        tiny_decoder_config(transformers.Qwen2Config, widths, vocab))),),
))
