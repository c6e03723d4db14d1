"""CLIP (``CLIPModel``, ``CLIPVisionModel(WithProjection)``, ``CLIPTextModel(WithProjection)``).

The attention stores its scale (``self.scale``) at construction, so only ``head_dim`` changes.
"""

import transformers

from upop.arch.registry import Family, ModelClass, TinyModel, register_family
from upop.arch._spec import ArchSpec, AttentionSite, MlpSite, Tower, set_attrs

_ATTN = AttentionSite(
    module="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", out="self_attn.out_proj"
)
_MLP = MlpSite(fc1="mlp.fc1", fc2="mlp.fc2")
ATTENTION, MLP = _ATTN, _MLP  # an encoder block's sites, public for the towers that are CLIP's (LLaVA's)

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
)


def _tiny(widths, vocab: int, image_size: int, num_labels: int) -> transformers.CLIPModel:
    h, n, heads, inter = widths
    cfg = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
            intermediate_size=inter, max_position_embeddings=32, bos_token_id=2, eos_token_id=3, pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, intermediate_size=inter,
            image_size=image_size, patch_size=8 if image_size <= 96 else 16,
        ),
        projection_dim=h,
    )
    return transformers.CLIPModel(cfg)


def _processor(image_size: int, tokenizer):
    from upop.data.retrieval import make_clip_processor

    return make_clip_processor(image_size, tokenizer)


_BOTH = {"vision": "features", "text": "features"}
FAMILY = register_family(Family(
    spec=SPEC,
    classes=(
        ModelClass("CLIPModel", tasks=("retrieval", "distill"), reads=("image", "text"), export=_BOTH),
        ModelClass("CLIPVisionModel", tasks=("distill",)),
        ModelClass("CLIPVisionModelWithProjection", tasks=("distill",)),
        ModelClass("CLIPTextModel", tasks=("distill",), reads=("text",)),
        ModelClass("CLIPTextModelWithProjection", tasks=("distill",), reads=("text",)),
    ),
    tiny=(TinyModel("clip", "CLIPModel", build=_tiny, processor=_processor, data_task="retrieval"),),
))
