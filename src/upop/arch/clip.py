"""CLIP (``CLIPModel``, ``CLIPVisionModel(WithProjection)``, ``CLIPTextModel(WithProjection)``).

The attention stores its scale (``self.scale``) at construction, so only ``head_dim`` changes.
"""

from ._spec import ArchSpec, AttentionSite, MlpSite, Tower, set_attrs

_ATTN = AttentionSite(
    module="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", out="self_attn.out_proj"
)
_MLP = MlpSite(fc1="mlp.fc1", fc2="mlp.fc2")

SPEC = ArchSpec(
    name="clip",
    model_types=("clip", "clip_vision_model", "clip_text_model"),
    towers=(
        Tower(("vision_model.encoder.layers",), "vision", (_ATTN,), _MLP, config="vision_config"),
        Tower(("text_model.encoder.layers",), "text", (_ATTN,), _MLP, config="text_config"),
        # CLIPVisionModel / CLIPTextModel keep their encoder at the root.
        Tower(("encoder.layers",), "vision", (_ATTN,), _MLP, only=("clip_vision_model",)),
        Tower(("encoder.layers",), "text", (_ATTN,), _MLP, only=("clip_text_model",)),
    ),
    set_head_dim=set_attrs(head_dim=lambda new, dense, heads: new),
    classes=(
        "CLIPModel",
        "CLIPVisionModel",
        "CLIPVisionModelWithProjection",
        "CLIPTextModel",
        "CLIPTextModelWithProjection",
    ),
)
