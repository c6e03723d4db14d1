"""SigLIP (``SiglipModel``, ``SiglipVisionModel``, ``SiglipTextModel``, ``SiglipForImageClassification``).

The encoder blocks are CLIP's (``self_attn.{q,k,v,out}_proj``, ``mlp.fc1/fc2``); the attention
stores its scale (``self.scale``) at construction, so only ``head_dim`` changes. The vision tower
has no class token (tokens = patches). Not pruned: the vision tower's attention-pooling ``head``
(a ``torch.nn.MultiheadAttention`` and an MLP over one probe token, outside ``encoder.layers``)
and the text ``head`` projection. SigLIP2 has its own spec (:mod:`.siglip2`): NaFlex patches, and
the vision token count for FLOPs costs is its config's maximum ``num_patches``.
"""

from ._spec import ArchSpec, AttentionSite, MlpSite, Tower, set_attrs

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
    classes=("SiglipModel", "SiglipVisionModel", "SiglipTextModel", "SiglipForImageClassification"),
)
