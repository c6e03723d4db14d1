"""ViT and DeiT (``ViTModel``, ``ViTForImageClassification``, ``DeiTModel``,
``DeiTForImageClassification(WithTeacher)``).

The attention stores its scale (``self.scaling``) at construction, so only ``head_dim`` changes.
DeiT adds a distillation token to the class token.
"""

import transformers

from upop.arch.registry import SIZES, Family, ModelClass, TinyModel, register_family  # noqa: F401
from upop.arch._spec import ArchSpec, AttentionSite, MlpSite, Tower, set_attrs

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
)

DEIT = ArchSpec(
    name="deit",
    model_types=("deit",),
    towers=(Tower(("layers", "deit.layers", "encoder.layer", "deit.encoder.layer"), "vision", (_ATTN,), _MLP),),
    set_head_dim=_SET,
    vision_extra_tokens=2,
)


def vit_processor(image_size: int, tokenizer):
    """A PIL ViT image processor resizing to ``image_size`` (no torchvision)."""
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    return ViTImageProcessorPil(size={"height": image_size, "width": image_size})


def classification_classes() -> list[str]:
    """The Shapes classification classes, in the order ImageFolder numbers them (sorted folders)."""
    from upop.data import shapes_vision

    return sorted(shapes_vision.class_name(c, k) for c, k in shapes_vision.CLASSIFICATION_CLASSES)


def _config(cls, widths, image_size: int, num_labels: int):
    h, n, heads, inter = widths
    return cls(hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, intermediate_size=inter,
               image_size=image_size, patch_size=8 if image_size <= 96 else 16, num_labels=num_labels, qkv_bias=True)


_CLASSIFY = dict(tasks=("classification", "distill"))
VIT_FAMILY = register_family(Family(
    spec=VIT,
    classes=(ModelClass("ViTModel", tasks=("distill",)), ModelClass("ViTForImageClassification", **_CLASSIFY)),
    tiny=(TinyModel("vit", "ViTForImageClassification", data_task="classification", processor=vit_processor,
                    class_names=classification_classes,
                    build=lambda widths, vocab, image_size, num_labels: transformers.ViTForImageClassification(
                        _config(transformers.ViTConfig, widths, image_size, num_labels))),),
))
DEIT_FAMILY = register_family(Family(
    spec=DEIT,
    classes=(ModelClass("DeiTModel", tasks=("distill",)), ModelClass("DeiTForImageClassification", **_CLASSIFY),
             ModelClass("DeiTForImageClassificationWithTeacher", **_CLASSIFY)),
    tiny=(TinyModel("deit", "DeiTForImageClassificationWithTeacher", data_task="classification",
                    processor=vit_processor, class_names=classification_classes,
                    build=lambda widths, vocab, image_size, num_labels:
                    transformers.DeiTForImageClassificationWithTeacher(
                        _config(transformers.DeiTConfig, widths, image_size, num_labels))),),
))
