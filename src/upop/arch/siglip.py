"""SigLIP (``SiglipModel``, ``SiglipVisionModel``, ``SiglipTextModel``, ``SiglipForImageClassification``).

The encoder blocks are CLIP's (``self_attn.{q,k,v,out}_proj``, ``mlp.fc1/fc2``); the attention
stores its scale (``self.scale``) at construction, so only ``head_dim`` changes. The vision tower
has no class token (tokens = patches). Not pruned: the vision tower's attention-pooling ``head``
(a ``torch.nn.MultiheadAttention`` and an MLP over one probe token, outside ``encoder.layers``)
and the text ``head`` projection. SigLIP2 has its own spec (:mod:`.siglip2`): NaFlex patches, and
the vision token count for FLOPs costs is its config's maximum ``num_patches``.
"""

import transformers

from upop.arch.registry import Family, ModelClass, TinyModel, register_family
from upop.arch.vit import classification_classes
from upop.arch._spec import ArchSpec, AttentionSite, MlpSite, Tower, set_attrs

_ATTN = AttentionSite(
    module="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", out="self_attn.out_proj"
)
_MLP = MlpSite(fc1="mlp.fc1", fc2="mlp.fc2")

SPEC = ArchSpec(
    name="siglip",
    model_types=("siglip", "siglip_vision_model", "siglip_text_model"),
    towers=(
        Tower(("vision_model.encoder.layers",), "vision", (_ATTN,), _MLP, config="vision_config"),
        Tower(("text_model.encoder.layers",), "text", (_ATTN,), _MLP, config="text_config"),
        # SiglipVisionModel / SiglipTextModel keep their encoder at the root.
        Tower(("encoder.layers",), "vision", (_ATTN,), _MLP, only=("siglip_vision_model",)),
        Tower(("encoder.layers",), "text", (_ATTN,), _MLP, only=("siglip_text_model",)),
    ),
    set_head_dim=set_attrs(head_dim=lambda new, dense, heads: new),
    vision_extra_tokens=0,
)


def _config(widths, vocab: int, image_size: int, **extra) -> transformers.SiglipConfig:
    """The tiny SigLIP config: both towers at ``widths`` (a classifier keeps the text tower's
    config too, so its ``config.json`` is the tiny SigLIP's plus the classes)."""
    h, n, heads, inter = widths
    common = dict(hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, intermediate_size=inter)
    return transformers.SiglipConfig(
        text_config=dict(vocab_size=vocab, max_position_embeddings=32, bos_token_id=2, eos_token_id=3, pad_token_id=0,
                         projection_size=h, **common),
        vision_config=dict(image_size=image_size, patch_size=8 if image_size <= 96 else 16, **common),
        **extra,
    )


def _tiny(widths, vocab: int, image_size: int, num_labels: int) -> transformers.SiglipModel:
    return transformers.SiglipModel(_config(widths, vocab, image_size))


def _tiny_classifier(widths, vocab: int, image_size: int,
                     num_labels: int) -> transformers.SiglipForImageClassification:
    """SigLIP's vision tower with a linear head over the mean patch token (its attention-pooling
    ``head`` is built but unused by this class's forward)."""
    return transformers.SiglipForImageClassification(_config(widths, vocab, image_size, num_labels=num_labels))


def _processor(image_size: int, tokenizer):
    """SigLIP's processor: the Shapes tokenizer and the PIL image processor (no torchvision). The
    classifier's folder holds it too: ``AutoProcessor`` maps a SigLIP config to this class and fails
    on a folder holding the image processor alone."""
    from transformers import SiglipProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    return SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)


FAMILY = register_family(Family(
    spec=SPEC,
    classes=(
        ModelClass("SiglipModel", tasks=("retrieval", "distill"), reads=("image", "text"), retrieval="siglip",
                   export={"vision": "features", "text": "features"}),
        ModelClass("SiglipVisionModel", tasks=("distill",)),
        ModelClass("SiglipTextModel", tasks=("distill",), reads=("text",)),
        ModelClass("SiglipForImageClassification", tasks=("classification",)),
    ),
    tiny=(TinyModel("siglip", "SiglipModel", build=_tiny, processor=_processor, data_task="retrieval"),
          TinyModel("siglip-classifier", "SiglipForImageClassification", build=_tiny_classifier,
                    processor=_processor, data_task="classification", class_names=classification_classes)),
))
