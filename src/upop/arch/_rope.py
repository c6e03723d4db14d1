"""What the decoder-LLM families share (Llama, Qwen2, Mistral: ``arch/llama.py``, ...): the
attention and gated-MLP sites of a decoder block, the hooks that update a pruned attention, and
:class:`RopePairsAttention`, the forward of an attention whose rotary pairs were pruned.

A family module defines its pruned attention class as ``class RopePairs<X>Attention(RopePairsAttention,
<X>Attention)`` (so a compressed folder's ``modeling_upop.py`` can copy both, see
:mod:`upop.checkpoint.hub`) and swaps it in with :func:`rope_swap`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from upop.arch._spec import AttentionSite, MlpSite

#: the attention of a decoder block: separate Q, K, V (K and V may have fewer heads), rotary pairs
ATTENTION = AttentionSite(module="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                          out="self_attn.o_proj", rope=True)
#: the gated MLP: ``down(act(gate(x)) * up(x))``; the mask multiplies ``up``
GATED_MLP = MlpSite(fc1="mlp.up_proj", fc2="mlp.down_proj", gate="mlp.gate_proj")


class RopePairsAttention:
    """The forward of a decoder attention whose head channels are a subset of the dense rotary
    pairs: ``self.rope_pairs[i]`` is the dense pair of pruned channels ``i`` and
    ``i + len(rope_pairs)``, whose cos/sin it takes from the model's (dense) rotary embedding, then
    runs the attention class's own forward. Mixed in before a transformers attention class."""

    def forward(self, hidden_states, position_embeddings=None, *args, **kwargs):
        pairs = getattr(self, "rope_pairs", None)
        if pairs is not None and position_embeddings is not None:
            cos, sin = position_embeddings
            index = self.__dict__.get("_rope_index")
            if index is None or index.device != cos.device:
                kept = torch.tensor(pairs, dtype=torch.long)
                index = torch.cat([kept, kept + cos.shape[-1] // 2]).to(cos.device)
                self.__dict__["_rope_index"] = index
            position_embeddings = (cos.index_select(-1, index), sin.index_select(-1, index))
        return super().forward(hidden_states, position_embeddings, *args, **kwargs)


def rope_swap(dense: type, pruned: type) -> Callable[[nn.Module], None]:
    """The ``swap_class`` hook of a decoder family: a ``dense`` attention becomes ``pruned`` (the same
    module with :class:`RopePairsAttention`'s forward) and records its head counts as attributes
    (the dense module reads them from the config; a pruned one may have fewer)."""

    def swap(module: nn.Module) -> None:
        if type(module) is dense:
            module.__class__ = pruned
            module.num_heads = module.config.num_attention_heads
            module.num_key_value_heads = module.config.num_key_value_heads

    return swap


def set_decoder_head_dim(module: nn.Module, new: int, dense: int, heads: int) -> None:
    """The attention reshapes with ``head_dim`` and keeps its dense ``scaling``."""
    module.head_dim = new


def set_decoder_heads(module: nn.Module, heads: int) -> None:
    """Whole K/V heads were pruned with their query heads: the query-per-KV ratio is unchanged;
    the counts are recorded for readers (the forward infers them from the shapes)."""
    module.num_heads = heads
    module.num_key_value_heads = heads // module.num_key_value_groups


def check_rope(model: nn.Module) -> None:
    """Refuse a rotary variant whose frequencies are not per pair of channels."""
    from upop.errors import UnsupportedModelError

    rope = getattr(getattr(model, "config", None), "rope_parameters", None) or {}
    kind = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    if kind not in ("default", "linear", "dynamic", "llama3", "yarn", "longrope"):
        raise UnsupportedModelError(f"{type(model).__name__}: rope_type {kind!r} is not one upop prunes")


def tiny_decoder_config(config_class: type, widths, vocab: int, **extra):
    """A tiny decoder config of ``widths`` (hidden, layers, heads, intermediate): half as many K/V
    heads as query heads, 128 positions, the Shapes tokenizer's special ids."""
    h, n, heads, inter = widths
    return config_class(vocab_size=vocab, hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
                        num_key_value_heads=max(1, heads // 2), intermediate_size=inter, max_position_embeddings=128,
                        pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False, **extra)


def shapes_tokenizer(size: int, tokenizer):
    """The Shapes word tokenizer, for documents of up to 128 tokens."""
    from upop.data.tokenizer import build_shapes_tokenizer

    return build_shapes_tokenizer(model_max_length=128)


def decoder_family(name: str, prefix: str, dense: type, pruned: type, classes: tuple = ()):
    """The :class:`~upop.arch.registry.Family` of a decoder LLM whose transformers classes are
    ``<prefix>ForCausalLM`` / ``<prefix>Model`` / ``<prefix>Config`` and whose attention ``dense`` is
    swapped for ``pruned`` (``RopePairs<X>Attention``, defined in the family's own module) when
    pruned; its tiny model ``name`` is made for the ``lm`` task. ``classes``: more
    :class:`~upop.arch.registry.ModelClass` entries of the family."""
    import transformers

    from upop.arch._spec import ArchSpec, Tower
    from upop.arch.registry import Family, ModelClass, TinyModel

    spec = ArchSpec(
        name=name,
        model_types=(name,),
        towers=(Tower(("model.layers", "layers"), "text", (ATTENTION,), GATED_MLP),),
        set_head_dim=set_decoder_head_dim,
        set_num_heads=set_decoder_heads,
        swap_class=rope_swap(dense, pruned),
        check=check_rope,
    )
    causal, config = getattr(transformers, f"{prefix}ForCausalLM"), getattr(transformers, f"{prefix}Config")
    return Family(
        spec=spec,
        classes=(
            ModelClass(causal.__name__, tasks=("lm", "distill"), reads=("text",), causal=True),
            ModelClass(f"{prefix}Model", reads=("text",)),  # loads and prunes; no task reads a bare decoder
            *classes,
        ),
        tiny=(TinyModel(name, causal.__name__, processor=shapes_tokenizer, data_task="lm",
                        build=lambda widths, vocab, image_size, num_labels: causal(
                            tiny_decoder_config(config, widths, vocab))),),
    )
