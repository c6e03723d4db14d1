"""Segmenter (``upop.models.segmenter.SegmenterForSemanticSegmentation``): a ViT encoder and a
mask-transformer decoder, pruned together in one unified search.

- Encoder blocks (``vit.layers``): the ViT site names, modality ``vision``; token count from
  ``config.vision_config`` (patches + class token).
- Decoder blocks (``decoder.layers``): modality ``decoder``, same site names; their token count
  (patches + class embeddings) is ``config.max_position_embeddings``.

Both attention classes store their scale at construction and read ``head_dim`` in the forward,
so pruning only sets ``head_dim``. Importing this module imports :mod:`upop.models.segmenter`, which
registers ``SegmenterConfig`` with ``AutoConfig`` (so ``import upop`` is enough to load one).
"""

from upop.models import segmenter as _segmenter  # noqa: F401  (registers the config with AutoConfig)
from upop.arch.registry import SIZES, Family, ModelClass, TinyModel, register_family  # noqa: F401
from upop.arch.vit import vit_processor
from upop.arch._spec import ArchSpec, AttentionSite, MlpSite, Tower, set_attrs

_ATTN = AttentionSite(
    module="attention", q="attention.q_proj", k="attention.k_proj", v="attention.v_proj", out="attention.o_proj"
)
_MLP = MlpSite(fc1="mlp.fc1", fc2="mlp.fc2")

SPEC = ArchSpec(
    name="segmenter",
    model_types=("upop_segmenter",),
    towers=(
        Tower(("vit.layers",), "vision", (_ATTN,), _MLP, config="vision_config"),
        Tower(("decoder.layers",), "decoder", (_ATTN,), _MLP),
    ),
    set_head_dim=set_attrs(head_dim=lambda new, dense, heads: new),
)


def _tiny(widths, vocab: int, image_size: int, num_labels: int):
    return _segmenter.make_segmenter(*widths, image_size=image_size, num_labels=num_labels)


def _classes() -> list[str]:
    from upop.data import shapes_vision

    return list(shapes_vision.SEGMENTATION_CLASSES)


FAMILY = register_family(Family(
    spec=SPEC,
    classes=(ModelClass("SegmenterForSemanticSegmentation", tasks=("segmentation",),
                        project="upop.models.segmenter:SegmenterForSemanticSegmentation"),),
    tiny=(TinyModel("segmenter", "SegmenterForSemanticSegmentation", build=_tiny, processor=vit_processor,
                    data_task="segmentation", class_names=_classes),),
    project_config="upop.models.segmenter:SegmenterConfig",
))
