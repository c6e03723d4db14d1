"""Word-level tokenizer for the Shapes world captions.

The vocabulary is closed (:data:`upop.data.shapes.VOCABULARY`), so a WordLevel model with a
whitespace pre-tokenizer covers every caption exactly. Special tokens have fixed ids::

    <pad>=0 <unk>=1 <bos>=2 <eos>=3 [CLS]=4 [SEP]=5 [MASK]=6 [DEC]=7 [ENC]=8

followed by the vocabulary words in sorted order. A single sequence is encoded as
``<bos> words... <eos>``; a pair as ``<bos> A <eos> B <eos>``.

Note for CLIP text models: ``CLIPTextConfig`` must use ``eos_token_id=3`` (and
``bos_token_id=2``, ``pad_token_id=0``) so the pooled output is read at the ``<eos>`` position.
The legacy value ``eos_token_id=2`` makes CLIP pool at the arg-max id instead, which is wrong here.
"""
from __future__ import annotations

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from upop.errors import ConfigError
from upop.data.shapes import VOCABULARY

SPECIAL_TOKENS: list[str] = ["<pad>", "<unk>", "<bos>", "<eos>", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]
SPECIAL_IDS: dict[str, int] = {"pad": 0, "unk": 1, "bos": 2, "eos": 3}


def shapes_vocab() -> dict[str, int]:
    """Token -> id mapping: the special tokens (ids 0..8) then :data:`VOCABULARY` in order."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in VOCABULARY:
        vocab.setdefault(word, len(vocab))
    return vocab


def build_shapes_tokenizer(model_max_length: int = 32) -> PreTrainedTokenizerFast:
    """Build the Shapes word-level tokenizer as a ``transformers.PreTrainedTokenizerFast``.

    Lower-cases input, splits on whitespace/punctuation, maps unknown words to ``<unk>`` and
    wraps each sequence in ``<bos>`` ... ``<eos>``. Padding is on the right. It round-trips
    through ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` with identical ids.
    """
    if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) or model_max_length < 3:
        raise ConfigError(f"build_shapes_tokenizer: model_max_length={model_max_length!r} is not allowed "
                          "(need an integer >= 3: <bos>, one word, <eos>)")
    vocab = shapes_vocab()
    core = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>",
        pair="<bos> $A <eos> $B:1 <eos>:1",
        special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])],
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
        extra_special_tokens=["[DEC]", "[ENC]"],
        padding_side="right", truncation_side="right",
        model_max_length=model_max_length,
    )
    for name, expected in SPECIAL_IDS.items():
        got = getattr(tok, f"{name}_token_id")
        if got != expected:  # guards against a tokenizers/transformers change re-numbering specials
            raise RuntimeError(f"shapes tokenizer: {name} token got id {got}, expected {expected}")
    return tok
