"""SigLIP2 (``Siglip2Model``, ``Siglip2VisionModel``, ``Siglip2TextModel``, ``Siglip2ForImageClassification``).

The encoder blocks are SigLIP's (``self_attn.{q,k,v,out}_proj``, ``mlp.fc1/fc2``; the attention
stores its scale at construction, so only ``head_dim`` changes), and the same parts stay dense:
the vision tower's attention-pooling ``head`` and the text ``head`` projection.

The vision tower is NaFlex: it takes ``pixel_values`` of shape ``(B, num_patches, C * p * p)``
(patches, not an image), ``pixel_attention_mask`` ``(B, num_patches)`` and ``spatial_shapes``
``(B, 2)`` (each image's patch grid, at its own aspect ratio). Its config has no ``image_size``;
``vision_config.num_patches`` is the MAXIMUM patch count an image is resized to fit, and the
vision token count used for FLOPs costs is that maximum (no class token): an image with fewer
patches is padded to it, and the padded tokens are computed (masked) all the same.
"""

import transformers

from upop.arch.registry import Family, ModelClass, TinyModel, register_family
from upop.arch._spec import ArchSpec, AttentionSite, MlpSite, Tower, set_attrs

_ATTN = AttentionSite(
    module="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", out="self_attn.out_proj"
)
_MLP = MlpSite(fc1="mlp.fc1", fc2="mlp.fc2")

SPEC = ArchSpec(
    name="siglip2",
    model_types=("siglip2", "siglip2_vision_model", "siglip2_text_model"),
    towers=(
        Tower(("vision_model.encoder.layers",), "vision", (_ATTN,), _MLP, config="vision_config"),
        Tower(("text_model.encoder.layers",), "text", (_ATTN,), _MLP, config="text_config"),
        # Siglip2VisionModel / Siglip2TextModel keep their encoder at the root.
        Tower(("encoder.layers",), "vision", (_ATTN,), _MLP, only=("siglip2_vision_model",)),
        Tower(("encoder.layers",), "text", (_ATTN,), _MLP, only=("siglip2_text_model",)),
    ),
    set_head_dim=set_attrs(head_dim=lambda new, dense, heads: new),
    vision_extra_tokens=0,
)


def naflex_patches(image_size: int) -> tuple[int, int]:
    """SigLIP2's NaFlex patch size and maximum patch count for ``image_size`` (a square image of
    that side fills the patch budget exactly)."""
    patch = 8 if image_size <= 96 else 16
    return patch, max(1, image_size // patch) ** 2


def _tiny(widths, vocab: int, image_size: int, num_labels: int) -> transformers.Siglip2Model:
    h, n, heads, inter = widths
    patch, num_patches = naflex_patches(image_size)
    common = dict(hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, intermediate_size=inter)
    cfg = transformers.Siglip2Config(
        text_config=dict(vocab_size=vocab, max_position_embeddings=32, bos_token_id=2, eos_token_id=3, pad_token_id=0,
                         projection_size=h, **common),
        vision_config=dict(num_patches=num_patches, patch_size=patch, **common),
    )
    return transformers.Siglip2Model(cfg)


def _processor(image_size: int, tokenizer):
    """A ``Siglip2Processor`` with the PIL NaFlex image processor (no torchvision): each image is
    resized, keeping its aspect ratio, to at most the model's ``num_patches`` patches and padded
    to that count (``pixel_values`` (B, num_patches, 3 * p * p), ``pixel_attention_mask``,
    ``spatial_shapes``)."""
    from transformers import Siglip2Processor
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    patch, num_patches = naflex_patches(image_size)
    image_processor = Siglip2ImageProcessorPil(patch_size=patch, max_num_patches=num_patches)
    return Siglip2Processor(image_processor=image_processor, tokenizer=tokenizer)


_NAFLEX = ("a NaFlex vision tower (SigLIP2): spatial_shapes sizes its position embeddings per image; a Siglip2TextModel "
           "exports")
FAMILY = register_family(Family(
    spec=SPEC,
    classes=(
        ModelClass("Siglip2Model", tasks=("retrieval", "distill"), reads=("image", "text"), retrieval="siglip",
                   export={"text": "features"}, export_refused=_NAFLEX),
        ModelClass("Siglip2VisionModel", tasks=("distill",), export_refused=_NAFLEX),
        ModelClass("Siglip2TextModel", tasks=("distill",), reads=("text",)),
        ModelClass("Siglip2ForImageClassification", export_refused=_NAFLEX),
    ),
    tiny=(TinyModel("siglip2", "Siglip2Model", build=_tiny, processor=_processor, data_task="retrieval"),),
))
