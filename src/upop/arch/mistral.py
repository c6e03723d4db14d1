"""Mistral decoder LLMs (``MistralForCausalLM``, ``MistralModel``): Llama's block with a sliding-window attention mask (the
sites, units and hooks are the decoder families' own, :mod:`upop.arch._rope`; see :mod:`upop.arch.llama`)."""

from __future__ import annotations

import transformers
from transformers.models.mistral.modeling_mistral import MistralAttention

from upop.arch.registry import Family, ModelClass, TinyModel, register_family
from upop.arch._rope import (ATTENTION, GATED_MLP, RopePairsAttention, check_rope, rope_swap, set_decoder_head_dim,
                             set_decoder_heads, shapes_tokenizer, tiny_decoder_config)
from upop.arch._spec import ArchSpec, Tower


class RopePairsMistralAttention(RopePairsAttention, MistralAttention):
    """``MistralAttention`` after its rotary pairs were pruned (see :class:`RopePairsAttention`)."""


SPEC = ArchSpec(
    name="mistral",
    model_types=("mistral",),
    towers=(Tower(("model.layers", "layers"), "text", (ATTENTION,), GATED_MLP),),
    set_head_dim=set_decoder_head_dim,
    set_num_heads=set_decoder_heads,
    swap_class=rope_swap(MistralAttention, RopePairsMistralAttention),
    check=check_rope,
)

FAMILY = register_family(Family(
    spec=SPEC,
    classes=(
        ModelClass("MistralForCausalLM", tasks=("lm", "distill"), reads=("text",)),
        ModelClass("MistralModel", reads=("text",)),  # loads and prunes; no task reads a bare decoder
    ),
    tiny=(TinyModel("mistral", "MistralForCausalLM", processor=shapes_tokenizer, data_task="lm",
                    build=lambda widths, vocab, image_size, num_labels: transformers.MistralForCausalLM(
                        tiny_decoder_config(transformers.MistralConfig, widths, vocab))),),
))
