"""DINOv2 (``Dinov2Model``, ``Dinov2ForImageClassification``).

Blocks: ``attention.{q,k,v,o}_proj`` and ``mlp.fc1/fc2``. The attention stores its scale
(``self.scaling``) at construction, so only ``head_dim`` changes. The LayerScales after the
attention and the MLP act per hidden dimension (not pruned, unaffected), as is the classifier
of ``Dinov2ForImageClassification`` over cat(CLS, mean patch). Tokens: patches + the class
token. The SwiGLU MLP (``use_swiglu_ffn``: gate and up projections both produce the neurons)
is not supported: :func:`check_model` refuses it.
"""

from upop.errors import UnsupportedModelError
import transformers

from upop.arch.registry import SIZES, Family, ModelClass, TinyModel, register_family  # noqa: F401
from upop.arch.vit import classification_classes, vit_processor
from upop.arch._spec import ArchSpec, AttentionSite, MlpSite, Tower, set_attrs

_ATTN = AttentionSite(
    module="attention", q="attention.q_proj", k="attention.k_proj", v="attention.v_proj", out="attention.o_proj"
)
_MLP = MlpSite(fc1="mlp.fc1", fc2="mlp.fc2")


def check_model(model) -> None:
    """Refuse a DINOv2 with the SwiGLU MLP (``config.use_swiglu_ffn``), which this spec cannot slice."""
    if getattr(getattr(model, "config", None), "use_swiglu_ffn", False):
        raise UnsupportedModelError(f"{type(model).__name__} has use_swiglu_ffn=True (DINOv2 giant's SwiGLU MLP); "
                                    "upop supports DINOv2 with use_swiglu_ffn=False only")


SPEC = ArchSpec(
    check=check_model,
    name="dinov2",
    model_types=("dinov2",),
    towers=(Tower(("encoder.layer", "dinov2.encoder.layer"), "vision", (_ATTN,), _MLP),),
    set_head_dim=set_attrs(head_dim=lambda new, dense, heads: new),
)


def _tiny(widths, vocab: int, image_size: int, num_labels: int) -> transformers.Dinov2ForImageClassification:
    h, n, heads, inter = widths
    cfg = transformers.Dinov2Config(
        hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, mlp_ratio=inter // h, image_size=image_size,
        patch_size=8 if image_size <= 96 else 16, num_labels=num_labels,
    )
    return transformers.Dinov2ForImageClassification(cfg)


FAMILY = register_family(Family(
    spec=SPEC,
    classes=(ModelClass("Dinov2Model", tasks=("distill",)),
             ModelClass("Dinov2ForImageClassification", tasks=("classification", "distill"))),
    tiny=(TinyModel("dinov2", "Dinov2ForImageClassification", build=_tiny, processor=vit_processor,
                    data_task="classification", class_names=classification_classes),),
))
