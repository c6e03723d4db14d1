"""BLIP (``BlipForImageTextRetrieval``, ``BlipForQuestionAnswering``,
``BlipForConditionalGeneration``, upop's ``BlipForNLVR``).

- Vision tower: fused QKV attention whose forward reshapes with ``embed_dim // num_heads``; after
  pruning its class is swapped for :class:`ShapeGenericBlipAttention`, the same module with a
  forward that reads ``head_dim`` (same parameters, same names, same scale attribute).
- Text encoder: self-attention and MLPs are ``text``; cross-attention into the image is
  ``fusion``. ``BlipForNLVR`` has two cross-attentions per layer (``crossattention.self0`` /
  ``self1``, one per image, consumed by ``output.dense0`` / ``dense1``): two ``fusion`` groups
  (``crossattn0``, ``crossattn1``). Text decoder: every group is ``decoder``.
- The text attention computes its scale from ``attention_head_size`` at every forward, so pruning
  folds ``sqrt(new / dense)`` into the query rows to keep the dense scale.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.blip.modeling_blip import BlipAttention

import transformers

from upop.arch.registry import Family, ModelClass, TinyModel, register_family
from upop.arch._spec import ArchSpec, AttentionSite, MlpSite, Tower
from upop.arch.bert import MLP as TEXT_MLP
from upop.arch.bert import bert_attention


class ShapeGenericBlipAttention(BlipAttention):
    """``BlipAttention`` whose forward works for any ``head_dim`` (pruned widths)."""

    def forward(self, hidden_states: torch.Tensor, **kwargs):
        bsz, tgt_len, _ = hidden_states.size()
        qkv = self.qkv(hidden_states).reshape(bsz, tgt_len, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)
        scores = torch.matmul(query, key.transpose(-1, -2)) * self.scale
        probs = self.dropout(nn.functional.softmax(scores, dim=-1))
        context = torch.matmul(probs, value).permute(0, 2, 1, 3)
        context = context.reshape(bsz, tgt_len, self.num_heads * self.head_dim)
        return self.projection(context), probs


def _swap(module: nn.Module) -> None:
    if type(module) is BlipAttention:
        module.__class__ = ShapeGenericBlipAttention


def _set_head_dim(module: nn.Module, new: int, dense: int, heads: int) -> None:
    if hasattr(module, "attention_head_size"):
        module.attention_head_size = new
        module.all_head_size = new * heads
    else:
        module.head_dim = new


_VISION_ATTN = AttentionSite(module="self_attn", qkv="self_attn.qkv", out="self_attn.projection")
_VISION_MLP = MlpSite(fc1="mlp.fc1", fc2="mlp.fc2")
_TEXT_SELF = bert_attention("attention")
_TEXT_CROSS = bert_attention("crossattention", site="crossattn", modality="fusion", cross=True, optional=True)
_DEC_CROSS = bert_attention("crossattention", site="crossattn", cross=True, optional=True)
# BlipForNLVR: one cross-attention per image, each its own fusion group (as UPop's NLVR code masks them)
_NLVR_CROSS = tuple(
    AttentionSite(module=f"crossattention.self{k}", q=f"crossattention.self{k}.query", k=f"crossattention.self{k}.key",
                  v=f"crossattention.self{k}.value", out=f"crossattention.output.dense{k}", site=f"crossattn{k}",
                  modality="fusion", cross=True, optional=True)
    for k in (0, 1)
)

SPEC = ArchSpec(
    name="blip",
    model_types=("blip",),
    towers=(
        Tower(("vision_model.encoder.layers",), "vision", (_VISION_ATTN,), _VISION_MLP, config="vision_config"),
        Tower(("text_encoder.encoder.layer",), "text", (_TEXT_SELF, _TEXT_CROSS, *_NLVR_CROSS), TEXT_MLP,
              config="text_config"),
        Tower(("text_decoder.bert.encoder.layer",), "decoder", (_TEXT_SELF, _DEC_CROSS), TEXT_MLP, config="text_config"),
    ),
    set_head_dim=_set_head_dim,
    fold_scale_classes=("BlipTextSelfAttention",),
    swap_class=_swap,
)


def _config(widths, vocab: int, image_size: int) -> transformers.BlipConfig:
    h, n, heads, inter = widths
    patch = 8 if image_size <= 96 else 16
    return transformers.BlipConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=h, encoder_hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
            intermediate_size=inter, max_position_embeddings=32, bos_token_id=2, eos_token_id=3, pad_token_id=0,
            sep_token_id=5,
        ),
        vision_config=dict(
            hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, intermediate_size=inter,
            image_size=image_size, patch_size=patch,
            initializer_range=0.02,  # BlipVisionConfig's default 1e-10 leaves a random vision tower at ~0
        ),
        projection_dim=h,
        image_text_hidden_size=h,
    )


def _nlvr(widths, vocab: int, image_size: int, num_labels: int):
    """BLIP's NLVR layout: layers from the middle on merge their two cross-attentions by a Linear
    (BLIP's 12-layer encoder: from layer 6), so a tiny model has both kinds of layer."""
    from upop.models.blip_nlvr import BlipForNLVR

    config = _config(widths, vocab, image_size)
    config.text_config.nlvr_merge_from = config.text_config.num_hidden_layers // 2
    return BlipForNLVR(config)


def _built(cls_name: str):
    return lambda widths, vocab, image_size, num_labels: getattr(transformers, cls_name)(
        _config(widths, vocab, image_size))


def _processor(image_size: int, tokenizer):
    from transformers import BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    return BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


_VISION = {"vision": "vision_model"}
_BOTH = ("image", "text")
FAMILY = register_family(Family(
    spec=SPEC,
    classes=(
        ModelClass("BlipForImageTextRetrieval", tasks=("retrieval",), reads=_BOTH, retrieval="blip", export=_VISION,
                   export_refused="a retrieval model whose forward is one of two modes (ITM head or ITC similarity) "
                                  "of the same weights, re-run per candidate pair"),
        ModelClass("BlipForQuestionAnswering", tasks=("vqa",), reads=_BOTH, export=_VISION,
                   export_refused="a VQA model: its answers come from a decoding loop (generate), not one forward"),
        ModelClass("BlipForConditionalGeneration", tasks=("caption",), reads=_BOTH, export=_VISION,
                   export_refused="a captioning model: its output is a decoding loop (generate), not one forward"),
        ModelClass("BlipForNLVR", tasks=("nlvr",), reads=_BOTH, project="upop.models.blip_nlvr:BlipForNLVR", export=_VISION,
                   export_refused="an NLVR model whose forward takes image pairs through upop's own fusion layers"),
    ),
    tiny=(
        TinyModel("blip-retrieval", "BlipForImageTextRetrieval", build=_built("BlipForImageTextRetrieval"),
                  processor=_processor, data_task="retrieval"),
        TinyModel("blip-vqa", "BlipForQuestionAnswering", build=_built("BlipForQuestionAnswering"),
                  processor=_processor, data_task="vqa"),
        TinyModel("blip-caption", "BlipForConditionalGeneration", build=_built("BlipForConditionalGeneration"),
                  processor=_processor, data_task="caption"),
        TinyModel("blip-nlvr", "BlipForNLVR", build=_nlvr, processor=_processor, data_task="nlvr"),
    ),
))
