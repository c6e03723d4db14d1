"""What the decoder-LLM families share (Llama, Qwen2, Mistral, Qwen3: ``arch/llama.py``, ...): the
attention and gated-MLP sites of a decoder block, the hooks that update a pruned attention,
:class:`RopePairsAttention`, the forward of an attention whose rotary pairs were pruned, and
:class:`HeadNormsAttention`, what narrows the per-head RMSNorms of queries and keys (Qwen3's
``q_norm`` / ``k_norm``) with those pairs.

A family module defines its pruned attention class as ``class RopePairs<X>Attention(RopePairsAttention,
<X>Attention)`` (so a compressed folder's ``modeling_upop.py`` can copy both, see
:mod:`upop.checkpoint.hub`) and swaps it in with :func:`rope_swap`; an attention with per-head
norms puts :class:`HeadNormsAttention` first.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from upop.arch._spec import AttentionSite, MlpSite

#: the attention of a decoder block: separate Q, K, V (K and V may have fewer heads), rotary pairs,
#: and per-head norms over head_dim where the family has them (Qwen3's q_norm / k_norm)
ATTENTION = AttentionSite(module="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                          out="self_attn.o_proj", rope=True, norms=("self_attn.q_norm", "self_attn.k_norm"))
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


class HeadNormsAttention:
    """Narrows the RMSNorms over ``head_dim`` that an attention applies to its queries and keys before
    RoPE (Qwen3's ``q_norm`` / ``k_norm``) when its rotary pairs are pruned. Mixed in before
    :class:`RopePairsAttention`.

    The unit masks multiply the outputs of Q, K and V (:mod:`upop.pruning.masks`), so in the masked
    model a dropped pair's channels are exactly 0 when they reach the norm: it divides the sum of
    squares of the kept channels by the DENSE width ``D``. The pruned norm must do the same over its
    ``n`` kept channels: ``w * x / sqrt(S / D + eps)`` (``S``: the kept channels' sum of squares).
    That is a plain RMSNorm of width ``n`` (transformers' own class: its kernel, its parameter
    name ``weight``) with ``eps' = eps * D / n`` and ``w' = w * sqrt(D / n)``, since
    ``S / n + eps * D / n = (D / n) (S / D + eps)``; a norm of weight ``1 + w`` (Gemma) gets
    ``1 + w' = (1 + w) * sqrt(D / n)``. So the dense divisor lives in the norm's weight and its
    epsilon, both of which save and load as they are (the weight in the state dict, the epsilon
    in ``config.upop_shapes``); the forward runs the dense model's operators. A plain norm of the
    narrower width without them normalises by ``n`` and is not the masked model.

    Pruning sets :data:`~upop.arch._spec.ROPE_PAIRS` on the attention last: setting it narrows each
    norm still at its dense width to the kept channels, in the pruned head's order (the pairs'
    first halves, then their second halves). A norm already of the kept width is left as it is.
    In half precision the rescaled weight is rounded once to the weight's dtype."""

    #: the per-head norms of the attention, the name of their epsilon, and the offset of their
    #: weight (0: ``w * x``; 1: ``(1 + w) * x``)
    head_norms = ("q_norm", "k_norm")
    head_norm_eps = "variance_epsilon"
    head_norm_offset = 0.0

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name == "rope_pairs" and value is not None:
            self.narrow_head_norms(list(value))

    def narrow_head_norms(self, pairs):
        """Narrow every dense-width head norm to the channels of the kept rotary ``pairs``."""
        width = 2 * len(pairs)
        for attr in self.head_norms:
            norm = getattr(self, attr)
            old = norm.weight
            dense = old.shape[0]
            if dense == width:
                continue
            index = torch.tensor(pairs + [p + dense // 2 for p in pairs], dtype=torch.long, device=old.device)
            factor = (dense / width) ** 0.5
            offset = self.head_norm_offset
            weight = (old.detach().index_select(0, index).double() + offset) * factor - offset
            norm.weight = nn.Parameter(weight.to(old.dtype).contiguous(), requires_grad=old.requires_grad)
            setattr(norm, self.head_norm_eps, getattr(norm, self.head_norm_eps) * dense / width)


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


def decoder_family(name: str, prefix: str, dense: type, pruned: type, classes: tuple = (),
                   tiny_config: Callable | None = None):
    """The :class:`~upop.arch.registry.Family` of a decoder LLM whose transformers classes are
    ``<prefix>ForCausalLM`` / ``<prefix>Model`` / ``<prefix>Config`` and whose attention ``dense`` is
    swapped for ``pruned`` (``RopePairs<X>Attention``, defined in the family's own module) when
    pruned; its tiny model ``name`` is made for the ``lm`` task. ``classes``: more
    :class:`~upop.arch.registry.ModelClass` entries of the family. ``tiny_config``: ``(config class,
    widths, vocab) -> config`` of the tiny model, where :func:`tiny_decoder_config` is not it."""
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
    make_config = tiny_config or tiny_decoder_config
    return Family(
        spec=spec,
        classes=(
            ModelClass(causal.__name__, tasks=("lm", "distill"), reads=("text",), causal=True),
            ModelClass(f"{prefix}Model", reads=("text",)),  # loads and prunes; no task reads a bare decoder
            *classes,
        ),
        tiny=(TinyModel(name, causal.__name__, processor=shapes_tokenizer, data_task="lm",
                        build=lambda widths, vocab, image_size, num_labels: causal(
                            make_config(config, widths, vocab))),),
    )
