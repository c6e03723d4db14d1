"""ViT and DeiT (``ViTModel``, ``ViTForImageClassification``, ``DeiTModel``,
``DeiTForImageClassification(WithTeacher)``).

The attention stores its scale (``self.scaling``) at construction, so only ``head_dim`` changes.
DeiT adds a distillation token to the class token.
"""

from ._spec import ArchSpec, AttentionSite, MlpSite, Tower, set_attrs

_ATTN = AttentionSite(
    module="attention", q="attention.q_proj", k="attention.k_proj", v="attention.v_proj", out="attention.o_proj"
)
_MLP = MlpSite(fc1="mlp.fc1", fc2="mlp.fc2")
_SET = set_attrs(head_dim=lambda new, dense, heads: new)

VIT = ArchSpec(
    name="vit",
    model_types=("vit",),
    towers=(Tower(("layers", "vit.layers", "encoder.layer", "vit.encoder.layer"), "vision", (_ATTN,), _MLP),),
    set_head_dim=_SET,
    classes=("ViTModel", "ViTForImageClassification"),
)

DEIT = ArchSpec(
    name="deit",
    model_types=("deit",),
    towers=(Tower(("layers", "deit.layers", "encoder.layer", "deit.encoder.layer"), "vision", (_ATTN,), _MLP),),
    set_head_dim=_SET,
    vision_extra_tokens=2,
    classes=("DeiTModel", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher"),
)
