"""BERT-style text encoders (``BertModel`` and its task heads).

The attention stores ``scaling`` at construction; its forward reshapes with
``attention_head_size``. Cross-attention (``add_cross_attention``) is a ``fusion`` group.
"""

from ._spec import ArchSpec, AttentionSite, MlpSite, Tower, set_attrs


def _attention(prefix: str, **kw) -> AttentionSite:
    return AttentionSite(
        module=f"{prefix}.self",
        q=f"{prefix}.self.query",
        k=f"{prefix}.self.key",
        v=f"{prefix}.self.value",
        out=f"{prefix}.output.dense",
        **kw,
    )


SELF_ATTN = _attention("attention")
CROSS_ATTN = _attention("crossattention", site="crossattn", modality="fusion", cross=True, optional=True)
MLP = MlpSite(fc1="intermediate.dense", fc2="output.dense")
SET_HEAD_SIZE = set_attrs(
    attention_head_size=lambda new, dense, heads: new,
    all_head_size=lambda new, dense, heads: new * heads,
)

SPEC = ArchSpec(
    name="bert",
    model_types=("bert",),
    towers=(Tower(("encoder.layer", "bert.encoder.layer"), "text", (SELF_ATTN, CROSS_ATTN), MLP),),
    set_head_dim=SET_HEAD_SIZE,
    classes=(
        "BertModel",
        "BertForSequenceClassification",
        "BertForTokenClassification",
        "BertForQuestionAnswering",
        "BertForMultipleChoice",
        "BertForMaskedLM",
        "BertForPreTraining",
        "BertLMHeadModel",
        "BertForNextSentencePrediction",
    ),
)
