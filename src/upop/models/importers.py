"""Import checkpoints of the reference code into upop model folders (``upop import``).

This module: ``blip-nlvr`` and the helpers every BLIP importer shares (reading a ``.pth``,
config fields off shapes, key mapping checked both ways, the tokenizer, the folder).
:mod:`upop.models.importers_blip`: ``blip-retrieval``, ``blip-vqa``, ``blip-caption``.

``blip-nlvr``: a salesforce/BLIP NLVR2 checkpoint (``model_base_nlvr.pth``: ``{"model": state_dict,
...}``, read with ``torch.load(weights_only=True)``) becomes a :class:`~upop.models.blip_nlvr.BlipForNLVR`
folder. BLIP key layout (``models/blip_nlvr.py``, ``models/vit.py``, ``models/nlvr_encoder.py``):

- ``visual_encoder.``: ``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N.{norm1,
  attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm`` -> ``vision_model.`` (HF names, see
  :data:`RULES`);
- ``text_encoder.`` and ``cls_head.``: the same names in ``BlipForNLVR``.

Skipped keys (BLIP ignores them too): ``text_encoder.embeddings.position_ids`` (a constant
buffer). Every other key must map to a parameter of the same shape, and every parameter must be
filled; otherwise a :class:`~upop.errors.CheckpointError` names the first bad key.

The config is read off the shapes: widths, depths, image size (``pos_embed`` tokens x patch
size), vocabulary, and the first layer with ``crossattention.output.merge_layer`` (BLIP: 6).
Head counts are not in the shapes: width / 64, as in every BLIP ViT and BERT. Layer-norm eps:
1e-6 (BLIP's ViT), 1e-12 (BERT). BLIP writes its ``[ENC]`` token over the first token:
``text_config.nlvr_enc_token_id`` is that token's id in ``--tokenizer``, else the last id
(BLIP's tokenizer is BERT's plus ``[DEC]``, ``[ENC]``: 30523); likewise ``bos_token_id`` (``[DEC]``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from upop.errors import CheckpointError, ConfigError, show

#: (BLIP key prefix, HF key prefix) of BLIP's ViT (``models/vit.py``), the same in every BLIP model;
#: ``{i}`` is a block index; the rest of a key is kept
VISION_RULES: tuple[tuple[str, str], ...] = (
    ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj.", "vision_model.embeddings.patch_embedding."),
    ("visual_encoder.norm.", "vision_model.post_layernorm."),
    ("visual_encoder.blocks.{i}.norm1.", "vision_model.encoder.layers.{i}.layer_norm1."),
    ("visual_encoder.blocks.{i}.attn.qkv.", "vision_model.encoder.layers.{i}.self_attn.qkv."),
    ("visual_encoder.blocks.{i}.attn.proj.", "vision_model.encoder.layers.{i}.self_attn.projection."),
    ("visual_encoder.blocks.{i}.norm2.", "vision_model.encoder.layers.{i}.layer_norm2."),
    ("visual_encoder.blocks.{i}.mlp.", "vision_model.encoder.layers.{i}.mlp."),
)
#: (BLIP key prefix, BlipForNLVR key prefix): the ViT, then the text encoder and head keep their names
RULES: tuple[tuple[str, str], ...] = VISION_RULES + (("text_encoder.", "text_encoder."), ("cls_head.", "cls_head."))
#: BLIP keys that carry no weights of the model
SKIPPED = ("text_encoder.embeddings.position_ids",)
HEAD_DIM = 64


def _pattern(prefix: str) -> re.Pattern:
    return re.compile("^" + re.escape(prefix).replace(re.escape("{i}"), r"(?P<i>\d+)"))


def compile_rules(rules) -> tuple[list, list]:
    """``rules`` ((BLIP prefix, HF prefix) pairs) as (forward, backward) lists for :func:`translate`."""
    return [(_pattern(a), b) for a, b in rules], [(_pattern(b), a) for a, b in rules]


_FORWARD, _BACKWARD = compile_rules(RULES)


def translate(key: str, rules) -> str | None:
    """``key`` renamed by the first matching rule of ``rules`` (:func:`compile_rules`); None: no rule."""
    for pattern, target in rules:
        m = pattern.match(key)
        if m:
            return target.replace("{i}", m.groupdict().get("i") or "") + key[m.end():]
    return None


def blip_to_upop(key: str) -> str | None:
    """The ``BlipForNLVR`` name of BLIP key ``key`` (None: no rule)."""
    return translate(key, _FORWARD)


def upop_to_blip(name: str) -> str | None:
    """The BLIP key of ``BlipForNLVR`` parameter ``name`` (None: no rule)."""
    return translate(name, _BACKWARD)


def read_blip_checkpoint(path) -> dict[str, torch.Tensor]:
    """The ``"model"`` state dict of a BLIP ``.pth`` (weights-only unpickling, tensors only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {show(path)} is not a file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the weights-only unpickler raises many kinds on foreign bytes
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{show(path)} is not a readable torch checkpoint: {show(first, 160)}") from None
    if not isinstance(data, dict) or "model" not in data:
        keys = sorted(map(str, data))[:5] if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{show(path)} has no 'model' key (found {show(keys, 120)}); a BLIP checkpoint is "
                              "{'model': state_dict, ...}")
    sd = data["model"]
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(f"{show(path)}: 'model' is not a non-empty state dict")
    for key, value in sd.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{show(path)}: state dict entry {show(key, 120)} is not a named tensor")
    return sd


def _shape(sd: dict, key: str, where: Path, what: str = "NLVR") -> torch.Size:
    if key not in sd:
        raise CheckpointError(f"{show(where)}: the checkpoint has no key {show(key, 120)} that a BLIP {what} model has")
    return sd[key].shape


def _layers(sd: dict, prefix: str) -> int:
    pattern = re.compile("^" + re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def _heads(width: int, what: str) -> int:
    if width % HEAD_DIM:
        raise CheckpointError(f"{what} width {width} is not a multiple of the head width {HEAD_DIM}")
    return width // HEAD_DIM


def vision_fields(sd: dict[str, torch.Tensor], where: Path, what: str) -> dict:
    """``BlipVisionConfig`` fields read off the shapes of BLIP's ``visual_encoder.`` keys."""
    width = _shape(sd, "visual_encoder.cls_token", where, what)[-1]
    patch = _shape(sd, "visual_encoder.patch_embed.proj.weight", where, what)[-1]
    grid = math.isqrt(_shape(sd, "visual_encoder.pos_embed", where, what)[1] - 1)
    layers = _layers(sd, "visual_encoder.blocks.")
    if not layers:
        raise CheckpointError(f"{show(where)}: no visual_encoder.blocks.N keys: not a BLIP {what} checkpoint")
    return dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=_heads(width, "vision"),
                intermediate_size=_shape(sd, "visual_encoder.blocks.0.mlp.fc1.weight", where, what)[0],
                image_size=grid * patch, patch_size=patch, layer_norm_eps=1e-6, hidden_act="gelu")


def text_fields(sd: dict[str, torch.Tensor], prefix: str, where: Path, what: str) -> dict:
    """``BlipTextConfig`` fields read off the shapes of a BLIP BERT (``prefix``: ``text_encoder.`` ...).

    Token ids are BLIP's tokenizer's (BERT's plus ``[DEC]``, ``[ENC]``): ``[PAD]`` 0, ``[SEP]`` 102
    (also the end of a generated text), ``[DEC]`` (the decoder's start) the second-last id.
    """
    vocab, hidden = _shape(sd, f"{prefix}embeddings.word_embeddings.weight", where, what)
    layers = _layers(sd, f"{prefix}encoder.layer.")
    if not layers:
        raise CheckpointError(f"{show(where)}: no {prefix}encoder.layer.N keys: not a BLIP {what} checkpoint")
    sep = 102 if vocab > 102 else None
    return dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=_heads(hidden, "text"),
                intermediate_size=_shape(sd, f"{prefix}encoder.layer.0.intermediate.dense.weight", where, what)[0],
                max_position_embeddings=_shape(sd, f"{prefix}embeddings.position_embeddings.weight", where, what)[0],
                layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0, sep_token_id=sep, eos_token_id=sep,
                bos_token_id=vocab - 2)


def nlvr_config(sd: dict[str, torch.Tensor], where: Path = Path("checkpoint")):
    """A :class:`~transformers.BlipConfig` for ``BlipForNLVR`` read off BLIP state dict shapes."""
    from transformers import BlipConfig

    vision = vision_fields(sd, where, "NLVR")
    text = text_fields(sd, "text_encoder.", where, "NLVR")
    t_layers, vocab, hidden = text["num_hidden_layers"], text["vocab_size"], text["hidden_size"]
    merged = [i for i in range(t_layers) if f"text_encoder.encoder.layer.{i}.crossattention.output.merge_layer.weight" in sd]
    merge_from = merged[0] if merged else t_layers
    if merged != list(range(merge_from, t_layers)):
        gap = next(i for i in range(merge_from, t_layers) if i not in merged)
        raise CheckpointError(f"{show(where)}: the checkpoint has no key "
                              f"'text_encoder.encoder.layer.{gap}.crossattention.output.merge_layer.weight' (layers "
                              f"{merge_from}.. merge their cross-attentions)")
    text |= dict(encoder_hidden_size=_shape(sd, "text_encoder.encoder.layer.0.crossattention.self0.key.weight", where)[1],
                 nlvr_merge_from=merge_from, nlvr_enc_token_id=vocab - 1)
    text.pop("eos_token_id")  # BlipForNLVR generates nothing: BlipTextConfig's default, as this importer always wrote
    return BlipConfig(vision_config=vision, text_config=text, projection_dim=hidden, image_text_hidden_size=hidden)


def map_state_dict(sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor], where: Path, *,
                   forward=blip_to_upop, backward=upop_to_blip, skip=SKIPPED.__contains__,
                   model: str = "BlipForNLVR") -> dict[str, torch.Tensor]:
    """``sd`` (BLIP names) renamed to ``own`` 's names; every key and shape checked both ways.

    ``forward`` / ``backward`` rename a BLIP key to ``model`` 's parameter name and back (None:
    no rule); keys for which ``skip(key)`` holds are left out.
    """
    mapped = {}
    for key, value in sd.items():
        if skip(key):
            continue
        name = forward(key)
        if name is None or name not in own:
            raise CheckpointError(f"{show(where)}: unexpected key {show(key, 120)}: {model} with this config has no "
                                  "such weight")
        if value.shape != own[name].shape:
            raise CheckpointError(f"{show(where)}: key {show(key, 120)} has shape {tuple(value.shape)}, {model}'s "
                                  f"{name} has {tuple(own[name].shape)}")
        if not value.is_floating_point():
            raise CheckpointError(f"{show(where)}: key {show(key, 120)} holds {value.dtype}, not floating-point weights")
        mapped[name] = value
    for name in own:
        if name not in mapped:
            raise CheckpointError(f"{show(where)}: the checkpoint has no key {show(backward(name) or name, 120)} "
                                  f"({model}'s {name})")
    return mapped


def blip_tokenizer(folder, vocab: int):
    """A local BLIP tokenizer: BERT's, with ``[DEC]`` (bos) and ``[ENC]`` added as BLIP does."""
    from transformers import AutoTokenizer

    from upop.checkpoint.safe_load import local_folder

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local_folder(folder)), trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"--tokenizer {show(folder)}: no tokenizer could be read ({show(str(exc), 120)})") from None
    vocab_now = tokenizer.get_vocab()
    if "[DEC]" not in vocab_now:
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    if "[ENC]" not in vocab_now:
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if len(tokenizer) != vocab:
        raise ConfigError(f"--tokenizer {show(folder)} has {len(tokenizer)} tokens (with [DEC], [ENC]); the checkpoint's "
                          f"word embeddings have {vocab}")
    return tokenizer


def import_blip_nlvr(checkpoint, out, tokenizer=None):
    """Write ``checkpoint`` (a BLIP NLVR2 ``.pth``) as a ``BlipForNLVR`` folder ``out``.

    ``tokenizer``: a local folder with BERT's (bert-base-uncased) tokenizer files; without it the
    folder holds no tokenizer, only the image processor. Returns the model.
    """
    from upop.models.blip_nlvr import BlipForNLVR

    where = Path(checkpoint)
    sd = read_blip_checkpoint(where)
    config = nlvr_config(sd, where)
    tok = blip_tokenizer(tokenizer, config.text_config.vocab_size) if tokenizer is not None else None
    if tok is not None:
        config.text_config.nlvr_enc_token_id = tok.convert_tokens_to_ids("[ENC]")
        config.text_config.bos_token_id = tok.convert_tokens_to_ids("[DEC]")
        config.text_config.sep_token_id = tok.sep_token_id
    model = BlipForNLVR(config).eval()
    mapped = map_state_dict(sd, model.state_dict(), where)
    model.load_state_dict(mapped, strict=True)
    write_folder(model, out, tok)
    return model


def write_folder(model, out, tok) -> None:
    """Save ``model``, and BLIP's image processor at its image size with tokenizer ``tok`` (None: none)."""
    from transformers import BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    image_size = model.config.vision_config.image_size
    images = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    model.save_pretrained(out)
    if tok is None:
        images.save_pretrained(out)
    else:
        BlipProcessor(image_processor=images, tokenizer=tok).save_pretrained(out)


__all__ = ["RULES", "SKIPPED", "VISION_RULES", "blip_to_upop", "blip_tokenizer", "compile_rules", "import_blip_nlvr",
           "map_state_dict", "nlvr_config", "read_blip_checkpoint", "text_fields", "translate", "upop_to_blip",
           "vision_fields", "write_folder"]
