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

from ._spec import ArchSpec, AttentionSite, MlpSite, Tower, set_attrs

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
    classes=("Siglip2Model", "Siglip2VisionModel", "Siglip2TextModel", "Siglip2ForImageClassification"),
)
