"""BERT-style text encoders (``BertModel`` and its task heads).

The attention stores ``scaling`` at construction; its forward reshapes with
``attention_head_size``. Cross-attention (``add_cross_attention``) is a ``fusion`` group.
"""

import transformers

from upop.arch.registry import Family, ModelClass, TinyModel, register_family
from upop.arch._spec import ArchSpec, AttentionSite, MlpSite, Tower, set_attrs


def bert_attention(prefix: str, **kw) -> AttentionSite:
    return AttentionSite(
        module=f"{prefix}.self",
        q=f"{prefix}.self.query",
        k=f"{prefix}.self.key",
        v=f"{prefix}.self.value",
        out=f"{prefix}.output.dense",
        **kw,
    )


SELF_ATTN = bert_attention("attention")
CROSS_ATTN = bert_attention("crossattention", site="crossattn", modality="fusion", cross=True, optional=True)
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
)


def _tiny(widths, vocab: int, image_size: int, num_labels: int) -> transformers.BertForSequenceClassification:
    h, n, heads, inter = widths
    cfg = transformers.BertConfig(
        vocab_size=vocab, hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
        intermediate_size=inter, max_position_embeddings=32, num_labels=num_labels,
    )
    return transformers.BertForSequenceClassification(cfg)


_TEXT = dict(tasks=("distill",), reads=("text",))
FAMILY = register_family(Family(
    spec=SPEC,
    classes=(
        *(ModelClass(name, **_TEXT) for name in (
            "BertModel", "BertForSequenceClassification", "BertForTokenClassification", "BertForQuestionAnswering",
            "BertForMaskedLM", "BertForPreTraining", "BertLMHeadModel", "BertForNextSentencePrediction")),
        ModelClass("BertForMultipleChoice", reads=("text",)),  # loads and prunes; no task reads its choices
    ),
    tiny=(TinyModel("bert", "BertForSequenceClassification", build=_tiny, processor=lambda size, tokenizer: tokenizer,
                    data_task="distill"),),
))
