"""Llama-style decoder LLMs (``LlamaForCausalLM``, ``LlamaModel``).

A decoder block has grouped-query attention with rotary position embeddings and a gated MLP:

- attention units are rotary pairs of head channels (channel ``u`` with ``u + head_dim / 2``, which
  RoPE rotates together), shared by every query and key/value head (``--granularity head-dim``, the
  paper's unit), or whole key/value heads with their query heads (``--granularity head``). The
  granularity ``both`` is refused (its bilinear cost assumes as many K/V heads as query heads).
- after pruning pairs, the attention's class becomes :class:`RopePairsLlamaAttention`: the same
  module whose forward gives the kept channels the cos/sin of their dense pairs
  (``rope_pairs``), so every kept pair turns at its original frequency. The model's rotary
  embedding is untouched (it is shared by the layers, which keep different pairs); the attention
  keeps its stored dense scale (``scaling``).
- MLP units are gated neurons: a row of ``gate_proj`` and ``up_proj`` and a column of
  ``down_proj``; the mask multiplies ``up_proj``'s output (``act(gate) * up * mask``).
- RMSNorm, the embeddings and the LM head (tied or not) are not pruned; the KV cache of
  ``generate`` takes each layer's own width.
"""

from __future__ import annotations

import torch
import transformers
from transformers.models.llama.modeling_llama import LlamaAttention

from upop.arch.registry import Family, ModelClass, TinyModel, register_family
from upop.arch._spec import ArchSpec, AttentionSite, MlpSite, Tower


class RopePairsLlamaAttention(LlamaAttention):
    """``LlamaAttention`` whose head channels are a subset of the dense rotary pairs:
    ``self.rope_pairs[i]`` is the dense pair of pruned channels ``i`` and ``i + len(rope_pairs)``,
    whose cos/sin it takes from the model's (dense) rotary embedding."""

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


def swap_rope_attention(module) -> None:
    """Give a pruned Llama attention the forward of :class:`RopePairsLlamaAttention` and its head
    counts as attributes (the dense module reads them from the config; a pruned one may have fewer)."""
    if type(module) is LlamaAttention:
        module.__class__ = RopePairsLlamaAttention
        module.num_heads = module.config.num_attention_heads
        module.num_key_value_heads = module.config.num_key_value_heads


def set_decoder_head_dim(module, new: int, dense: int, heads: int) -> None:
    """The attention reshapes with ``head_dim`` and keeps its dense ``scaling``."""
    module.head_dim = new


def set_decoder_heads(module, heads: int) -> None:
    """Whole K/V heads were pruned with their query heads: the query-per-KV ratio is unchanged;
    the counts are recorded for readers (the forward infers them from the shapes)."""
    module.num_heads = heads
    module.num_key_value_heads = heads // module.num_key_value_groups


ATTENTION = AttentionSite(module="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                          out="self_attn.o_proj", rope=True)
GATED_MLP = MlpSite(fc1="mlp.up_proj", fc2="mlp.down_proj", gate="mlp.gate_proj")


def _check(model) -> None:
    from upop.errors import UnsupportedModelError

    config = getattr(model, "config", None)
    rope = getattr(config, "rope_parameters", None) or {}
    kind = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    if kind not in ("default", "linear", "dynamic", "llama3", "yarn", "longrope"):
        raise UnsupportedModelError(f"{type(model).__name__}: rope_type {kind!r} is not one upop prunes")


SPEC = ArchSpec(
    name="llama",
    model_types=("llama",),
    towers=(Tower(("model.layers", "layers"), "text", (ATTENTION,), GATED_MLP),),
    set_head_dim=set_decoder_head_dim,
    set_num_heads=set_decoder_heads,
    swap_class=swap_rope_attention,
    check=_check,
)


def _tiny(widths, vocab: int, image_size: int, num_labels: int) -> transformers.LlamaForCausalLM:
    h, n, heads, inter = widths
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2), intermediate_size=inter, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(cfg)


def shapes_tokenizer(size: int, tokenizer):
    """The Shapes word tokenizer, for documents of up to 128 tokens."""
    from upop.data.tokenizer import build_shapes_tokenizer

    return build_shapes_tokenizer(model_max_length=128)


FAMILY = register_family(Family(
    spec=SPEC,
    classes=(
        ModelClass("LlamaForCausalLM", tasks=("lm", "distill"), reads=("text",)),
        ModelClass("LlamaModel", reads=("text",)),  # loads and prunes; no task reads a bare decoder
    ),
    tiny=(TinyModel("llama", "LlamaForCausalLM", build=_tiny, processor=shapes_tokenizer, data_task="lm"),),
))
