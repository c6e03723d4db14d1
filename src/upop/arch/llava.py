"""LLaVA (``LlavaForConditionalGeneration``, ``LlavaModel``): a vision tower, a projector and a decoder
LLM, pruned by one search over the vision tower's groups (modality ``"vision"``) and the language
model's (modality ``"text"``).

- The vision tower is CLIP's (``CLIPVisionModel``) or SigLIP's (``SiglipVisionModel``), chosen by
  ``config.vision_config.model_type``. Both have CLIP's encoder blocks (:data:`upop.arch.clip.ATTENTION`,
  :data:`upop.arch.clip.MLP`) at ``vision_tower.encoder.layers``; the units, hooks and token count
  of each are its own family's (:mod:`upop.arch.clip`, :mod:`upop.arch.siglip`).
- The language model is any registered decoder family (Llama, Qwen2, Mistral...: the one whose
  spec has ``config.text_config.model_type``), with its rotary pairs, grouped-query heads and gated
  MLP (:mod:`upop.arch._rope`). Its attention becomes that family's ``RopePairs<X>Attention`` when
  pruned.
- The spec's hooks (``swap_class``, ``set_head_dim``, ``set_num_heads``) dispatch per attention
  module to the spec of the module's own config (``module.config.model_type``: the vision tower's
  or the decoder's); ``check`` refuses another vision tower or language model in one line and runs
  the decoder family's own check (its rotary variant). No scale is folded: CLIP, SigLIP and the
  decoders store their dense attention scale.
- Not pruned: the patch and token embeddings, the norms, the projector, ``lm_head`` (the hidden
  widths of both towers are kept, so the projector is unchanged).
- ``vision_feature_layer`` (LLaVA's default ``-2``): the projector reads the hidden state after
  block ``k`` of the vision tower (:func:`feature_blocks`; the largest ``k`` of a list). The blocks
  after it never reach the output, so they are not groups of the search: no mask, no cost, left
  dense and untouched (transformers still runs them and drops their output; their parameters get no
  gradient, which data parallelism finds like any other unused parameter). With ``-2`` the last
  vision block is such a block.
- Tokens for FLOPs costs: each vision block sees the tower's tokens (patches, and CLIP's class
  token); each LLM block sees ``text_tokens`` plus one image's tokens (:func:`image_tokens`: what
  the projector gives the LLM, which LlavaProcessor expands the image token to), or, without
  ``text_tokens``, the LLM's maximum positions (the longest sequence, image included). One image
  per sample.

The tiny model ``llava`` (``upop make-model llava``): a CLIP vision tower and a Llama of the
repository's tiny widths, ``vision_feature_layer=-2``; its processor a ``LlavaProcessor`` of the
Shapes tokenizer with an ``<image>`` token (the last id) and CLIP's PIL image processor, with a
plain chat template; it is made for ``--task vqa`` (chat prompts, answer-only loss, generation:
:mod:`upop.tasks.vlm_chat`).
"""

from __future__ import annotations

import transformers
from torch import nn

from upop.arch import clip
from upop.arch.registry import SPECS, Family, ModelClass, TinyModel, get_spec, register_family
from upop.arch._rope import ATTENTION as DECODER_ATTENTION
from upop.arch._rope import GATED_MLP, shapes_tokenizer, tiny_decoder_config
from upop.arch._spec import ArchSpec, Tower, set_head_count, vision_tokens
from upop.errors import UnsupportedModelError

#: ``config.vision_config.model_type`` of the vision towers LLaVA's spec prunes (both have CLIP's
#: encoder blocks); each is a model type of its own family's registered spec
VISION = ("clip_vision_model", "siglip_vision_model")
IMAGE_TOKEN = "<image>"
#: the tiny model's chat template (the Shapes vocabulary has no role words): ``<bos>``, then each turn
#: of the user (or system) as its text, an image as the image token, and each of the assistant as
#: ``[DEC] text <eos>``; the generation prompt is ``[DEC]``. It holds ``<bos>`` itself: tokenize its
#: text without the tokenizer's own special tokens (``add_special_tokens=False``)
CHAT_TEMPLATE = (
    "<bos>{% for message in messages %}{% if message['role'] == 'assistant' %}[DEC] {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image> {% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% if message['role'] == 'assistant' %} <eos>{% endif %} "
    "{% endfor %}{% if add_generation_prompt %}[DEC]{% endif %}"
)


def decoder_spec(model_type: object) -> ArchSpec | None:
    """The registered spec of a decoder LLM of ``model_type`` (its blocks have the decoder sites,
    :mod:`upop.arch._rope`), or None."""
    spec = SPECS.get(model_type) if isinstance(model_type, str) else None
    if spec is not None and any(t.attention == (DECODER_ATTENTION,) and t.mlp == GATED_MLP for t in spec.towers):
        return spec
    return None


def _part(model: nn.Module, name: str) -> nn.Module:
    """``vision_tower`` / ``language_model`` of a ``LlavaForConditionalGeneration`` or ``LlavaModel``."""
    return getattr(getattr(model, "model", model), name)


def check(model: nn.Module) -> None:
    """Refuse a LLaVA model whose vision tower or language model upop does not prune here."""
    config = model.config
    vision, text = config.vision_config.model_type, config.text_config.model_type
    if vision not in VISION:
        raise UnsupportedModelError(f"{type(model).__name__}: vision tower {vision!r} is not one upop prunes in a "
                                    f"LLaVA model; supported: {', '.join(VISION)}")
    decoder = decoder_spec(text)
    if decoder is None:
        known = sorted(t for t in SPECS if decoder_spec(t) is not None)
        raise UnsupportedModelError(f"{type(model).__name__}: language model {text!r} is not one upop prunes in a "
                                    f"LLaVA model; supported: {', '.join(known)}")
    for spec, part in ((SPECS[vision], "vision_tower"), (decoder, "language_model")):
        if spec.check is not None:
            spec.check(_part(model, part))


def _vision_tokens(config, text_tokens: int | None = None) -> int:
    """Tokens each vision block sees: patches, and CLIP's class token."""
    vision = config.vision_config
    return vision_tokens(vision, SPECS[vision.model_type].vision_extra_tokens)


def image_tokens(config) -> int:
    """Tokens one image gives the language model: the vision tower's tokens, less the first with
    ``vision_feature_select_strategy="default"``."""
    return _vision_tokens(config) - (config.vision_feature_select_strategy == "default")


def feature_blocks(config) -> int:
    """How many leading vision blocks reach the projector: hidden state ``k`` of
    ``vision_feature_layer`` (negative: from the end, ``-1`` the last block's output) is the
    output of block ``k - 1``; a list of layers needs its deepest."""
    layers, n = config.vision_feature_layer, config.vision_config.num_hidden_layers
    return max(k if k >= 0 else n + 1 + k for k in ([layers] if isinstance(layers, int) else layers))


def _text_tokens(config, text_tokens: int | None) -> int:
    if text_tokens:
        return text_tokens + image_tokens(config)
    return config.text_config.max_position_embeddings


def _swap(module: nn.Module) -> None:
    swap = get_spec(module).swap_class
    if swap is not None:
        swap(module)


def _set_head_dim(module: nn.Module, new: int, dense: int, heads: int) -> None:
    get_spec(module).set_head_dim(module, new, dense, heads)


def _set_num_heads(module: nn.Module, heads: int) -> None:
    (get_spec(module).set_num_heads or set_head_count)(module, heads)


SPEC = ArchSpec(
    name="llava",
    model_types=("llava",),
    towers=(
        Tower(("model.vision_tower.encoder.layers", "vision_tower.encoder.layers"), "vision", (clip.ATTENTION,),
              clip.MLP, config="vision_config", blocks=feature_blocks, tokens=_vision_tokens),
        Tower(("model.language_model.layers", "language_model.layers"), "text", (DECODER_ATTENTION,), GATED_MLP,
              config="text_config", tokens=_text_tokens),
    ),
    set_head_dim=_set_head_dim,
    set_num_heads=_set_num_heads,
    swap_class=_swap,
    check=check,
)


def _patch_size(image_size: int) -> int:
    """The tiny vision tower's patch: 8 pixels up to 96, 16 above (as the tiny CLIP's)."""
    return 8 if image_size <= 96 else 16


def _tiny(widths, vocab: int, image_size: int, num_labels: int) -> transformers.LlavaForConditionalGeneration:
    """CLIP's vision tower and a Llama at ``widths``; the image token is the last id of ``vocab``
    (the one the processor adds to the Shapes tokenizer)."""
    h, n, heads, inter = widths
    patch = _patch_size(image_size)
    vision = transformers.CLIPVisionConfig(hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
                                           intermediate_size=inter, image_size=image_size, patch_size=patch)
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=tiny_decoder_config(transformers.LlamaConfig, widths, vocab),
        image_token_index=vocab - 1, image_seq_length=(image_size // patch) ** 2, vision_feature_layer=-2,
    )
    return transformers.LlavaForConditionalGeneration(config)


def _processor(image_size: int, tokenizer) -> transformers.LlavaProcessor:
    """The Shapes tokenizer (128 positions) with the image token added last, CLIP's PIL image
    processor at ``image_size`` and the plain chat template."""
    from upop.data.retrieval import make_clip_processor

    tokenizer = shapes_tokenizer(image_size, tokenizer)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_processor = make_clip_processor(image_size, tokenizer).image_processor
    return transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                       patch_size=_patch_size(image_size),
                                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                       chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN)


_REFUSED = ("a generative vision-language model: its output is a decoding loop (generate) over the language model, "
            "not one forward")
FAMILY = register_family(Family(
    spec=SPEC,
    classes=(
        ModelClass("LlavaForConditionalGeneration", tasks=("vqa",), chat=True, reads=("image", "text"),
                   export={"vision": "model.vision_tower"}, export_refused=_REFUSED),
        # loads and prunes; no task reads it
        ModelClass("LlavaModel", reads=("image", "text"), export={"vision": "vision_tower"}, export_refused=_REFUSED),
    ),
    tiny=(TinyModel("llava", "LlavaForConditionalGeneration", build=_tiny, processor=_processor, data_task="vqa"),),
))
