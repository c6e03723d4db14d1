"""Import salesforce/BLIP's retrieval, VQA and captioning checkpoints (``upop import blip-...``).

Each released ``.pth`` (``{"model": state_dict, ...}``, read with ``torch.load(weights_only=True)``)
becomes the transformers class of its task, by key mapping alone (no BLIP code, no download):

=================  ==========================  ==========================================  ===============================
kind               BLIP class (file)           weights                                     transformers class
=================  ==========================  ==========================================  ===============================
``blip-retrieval`` BLIP_Retrieval              ``visual_encoder``, ``text_encoder``,       ``BlipForImageTextRetrieval``
                   (models/blip_retrieval.py)  ``vision_proj``, ``text_proj``, ``itm_head``
``blip-vqa``       BLIP_VQA (models/blip_vqa)  ``visual_encoder``, ``text_encoder``,       ``BlipForQuestionAnswering``
                                               ``text_decoder``
``blip-caption``   BLIP_Decoder (models/blip)  ``visual_encoder``, ``text_decoder``        ``BlipForConditionalGeneration``
=================  ==========================  ==========================================  ===============================

Key mapping: ``visual_encoder.`` (BLIP's ViT) -> ``vision_model.`` by
:data:`upop.models.importers.VISION_RULES` (the fused ``attn.qkv`` stays fused: the HF vision attention
has the same ``qkv`` Linear with the same (q, k, v) row order); everything else (BLIP's
``models/med.py`` BERT and LM head, ``vision_proj``, ``text_proj``, ``itm_head``) has the same name
in transformers.

Skipped keys (:data:`SKIPPED`, :data:`SKIPPED_PREFIXES`): the ``embeddings.position_ids``
buffers (constants); of a retrieval checkpoint also the momentum encoders (``visual_encoder_m.``,
``text_encoder_m.``, ``vision_proj_m.``, ``text_proj_m.``: training-only EMA copies), the
contrastive queues (``image_queue``, ``text_queue``, ``idx_queue``, ``ptr_queue``) and ``temp``,
BLIP's learned contrastive temperature (the HF class has no such parameter and scores ITC by
cosine similarity; upop's retrieval task trains with a fixed 0.07). Every other key must map to a
parameter of the same shape, and every parameter must be filled, otherwise a one-line
:class:`~upop.errors.CheckpointError` names the first bad key. BLIP's own ``load_checkpoint`` is
laxer: it interpolates ``pos_embed`` to the model's image size, drops keys of another shape and
loads with ``strict=False``; here the image size is read off ``pos_embed`` instead (HF's
``interpolate_pos_encoding=True`` runs other sizes) and nothing is dropped silently.

Tied weights (:data:`TIED`): BLIP's LM head ties ``cls.predictions.decoder.weight`` to the word
embeddings and ``decoder.bias`` to ``cls.predictions.bias`` (a checkpoint stores both names); so
does transformers. Both names must hold equal tensors; a checkpoint that has only one of them
fills the other.

The config is read off the shapes as for ``blip-nlvr`` (:func:`upop.models.importers.vision_fields`,
:func:`upop.models.importers.text_fields`); a retrieval checkpoint's ``vision_proj`` gives
``image_text_hidden_size`` (BLIP's ``embed_dim``, 256). BLIP's decoder trains with label
smoothing 0.1 (``models/med.py``), so VQA and caption configs set ``text_config.label_smoothing``
= 0.1 (transformers' default is 0), which the HF loss, and so upop's fine-tuning, uses.
``text_config.enc_token_id`` records BLIP's ``[ENC]`` id: BLIP writes it over the first token
for image-text matching and for the VQA question encoder, and upop's retrieval and VQA tasks
then do the same (:func:`upop.tasks._blip.encoder_ids`); transformers' classes feed the
tokenizer's ``[CLS]``. HF's :class:`~transformers.BlipConfig`
has one text config for the encoder and the decoder of VQA, and cross-attends into
``vision_config.hidden_size``-wide states in both, so a VQA checkpoint whose vision and text
widths differ cannot be represented (a shape error). Token ids follow ``--tokenizer`` (BLIP's
tokenizer is BERT's plus ``[DEC]``, ``[ENC]``: ``bos_token_id`` = ``[DEC]``, ``sep_token_id`` =
``eos_token_id`` = ``[SEP]``), else BLIP's (30522, 102).
"""

from __future__ import annotations

from pathlib import Path

import torch

from upop.errors import CheckpointError, ConfigError, show
from upop.models.importers import (VISION_RULES, blip_tokenizer, compile_rules, map_state_dict, read_blip_checkpoint, text_fields,
                        translate, vision_fields, write_folder)


def _same(*prefixes: str) -> tuple[tuple[str, str], ...]:
    """Rules for keys that keep their BLIP names."""
    return tuple((p, p) for p in prefixes)


#: kind -> (transformers class, key rules (BLIP prefix, HF prefix), the BERT whose shapes give the text config)
KINDS: dict[str, tuple[str, tuple, str]] = {
    "blip-retrieval": ("BlipForImageTextRetrieval",
                       VISION_RULES + _same("text_encoder.", "vision_proj.", "text_proj.", "itm_head."), "text_encoder."),
    "blip-vqa": ("BlipForQuestionAnswering", VISION_RULES + _same("text_encoder.", "text_decoder."), "text_encoder."),
    "blip-caption": ("BlipForConditionalGeneration", VISION_RULES + _same("text_decoder."), "text_decoder.bert."),
}
#: BLIP keys that carry no weights of the model (constant buffers)
SKIPPED = ("text_encoder.embeddings.position_ids", "text_decoder.bert.embeddings.position_ids")
#: retrieval training state: momentum (EMA) encoders, contrastive queues, the learned temperature
SKIPPED_PREFIXES = {"blip-retrieval": ("visual_encoder_m.", "text_encoder_m.", "vision_proj_m.", "text_proj_m.")}
SKIPPED_EXTRA = {"blip-retrieval": ("image_queue", "text_queue", "idx_queue", "ptr_queue", "temp")}
#: (tied key, key it is tied to) in BLIP's LM head and in transformers' (``_tied_weights_keys``)
TIED = (("text_decoder.cls.predictions.decoder.weight", "text_decoder.bert.embeddings.word_embeddings.weight"),
        ("text_decoder.cls.predictions.decoder.bias", "text_decoder.cls.predictions.bias"))

#: the LM loss's label smoothing in BLIP's decoder (models/med.py ``BertLMHeadModel``: 0.1)
LABEL_SMOOTHING = 0.1

_COMPILED = {kind: compile_rules(rules) for kind, (_, rules, _) in KINDS.items()}
_TOWERS = {"cls_head.": "blip-nlvr", "itm_head.": "blip-retrieval", "text_encoder.": "blip-vqa",
           "text_decoder.": "blip-caption"}


def _check(kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"checkpoint kind {show(kind)} is not one upop imports; use one of {', '.join(sorted(KINDS))} "
                          "or blip-nlvr")


def blip_to_hf(kind: str, key: str) -> str | None:
    """The transformers name of BLIP key ``key`` in a ``kind`` checkpoint (None: no rule)."""
    _check(kind)
    return translate(key, _COMPILED[kind][0])


def hf_to_blip(kind: str, name: str) -> str | None:
    """The BLIP key of transformers parameter ``name`` of a ``kind`` model (None: no rule)."""
    _check(kind)
    return translate(name, _COMPILED[kind][1])


def is_skipped(kind: str, key: str) -> bool:
    """Whether BLIP key ``key`` of a ``kind`` checkpoint is left out on purpose (module docstring)."""
    return (key in SKIPPED or key in SKIPPED_EXTRA.get(kind, ())
            or any(key.startswith(p) for p in SKIPPED_PREFIXES.get(kind, ())))


def guess_kind(sd: dict) -> str | None:
    """The BLIP checkpoint kind ``sd`` looks like, by its top-level weights (None: none of them)."""
    if any(k.startswith("text_decoder.") for k in sd) and any(k.startswith("itm_head.") for k in sd):
        return None  # BLIP_Pretrain: ITC, ITM and LM heads together; no single task class holds it
    for prefix, kind in _TOWERS.items():  # most specific first
        if any(k.startswith(prefix) for k in sd):
            return kind
    return None


def _untie(sd: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """``sd`` with each :data:`TIED` pair complete: equal tensors, a missing one filled from its twin."""
    sd = dict(sd)
    for tied, target in TIED:
        if tied in sd and target in sd:
            a, b = sd[tied], sd[target]
            if a.shape != b.shape or not torch.equal(a, b):
                raise CheckpointError(f"{show(where)}: key {show(tied, 120)} differs from {show(target, 120)}; BLIP "
                                      "and transformers tie them, so they must be equal")
        elif tied in sd or target in sd:
            present = tied if tied in sd else target
            sd[target if present == tied else tied] = sd[present]
    return sd


def blip_task_config(kind: str, sd: dict[str, torch.Tensor], where: Path = Path("checkpoint")):
    """A :class:`~transformers.BlipConfig` for ``kind`` 's class, read off BLIP state dict shapes."""
    from transformers import BlipConfig

    _check(kind)
    what = kind.removeprefix("blip-")
    found = guess_kind(sd)
    if found is not None and found != kind:
        tops = sorted({k.split(".")[0] for k in sd if not is_skipped(found, k)})
        raise CheckpointError(f"{show(where)} looks like a {found} checkpoint, not {kind} (its weights: "
                              f"{show(', '.join(tops), 120)}): use `upop import {found}`")
    vision = vision_fields(sd, where, what)
    text = text_fields(sd, KINDS[kind][2], where, what)
    text |= {"encoder_hidden_size": vision["hidden_size"], "enc_token_id": text["vocab_size"] - 1}
    if kind != "blip-retrieval":
        text["label_smoothing"] = LABEL_SMOOTHING
    extra = {}
    if kind == "blip-retrieval":
        if "vision_proj.weight" not in sd:
            raise CheckpointError(f"{show(where)}: the checkpoint has no key 'vision_proj.weight' that a BLIP {what} "
                                  "model has")
        extra["image_text_hidden_size"] = sd["vision_proj.weight"].shape[0]  # BLIP's embed_dim
    return BlipConfig(vision_config=vision, text_config=text, projection_dim=text["hidden_size"], **extra)


def import_blip_task(kind: str, checkpoint, out, tokenizer=None):
    """Write ``checkpoint`` (a BLIP ``kind`` ``.pth``) as a folder of its transformers class in ``out``.

    ``kind``: ``blip-retrieval``, ``blip-vqa`` or ``blip-caption``. ``tokenizer``: a local folder
    with BERT's (bert-base-uncased) tokenizer files (``[DEC]``, ``[ENC]`` are added as BLIP does);
    without it the folder holds no tokenizer, only the image processor. Returns the model.
    """
    import transformers

    _check(kind)
    where = Path(checkpoint)
    sd = _untie(read_blip_checkpoint(where), where)
    config = blip_task_config(kind, sd, where)
    tok = blip_tokenizer(tokenizer, config.text_config.vocab_size) if tokenizer is not None else None
    if tok is not None:
        text = config.text_config
        text.bos_token_id = tok.convert_tokens_to_ids("[DEC]")
        text.enc_token_id = tok.convert_tokens_to_ids("[ENC]")
        text.sep_token_id = text.eos_token_id = tok.sep_token_id
        text.pad_token_id = tok.pad_token_id
    cls_name = KINDS[kind][0]
    model = getattr(transformers, cls_name)(config).eval()
    forward, backward = _COMPILED[kind]
    mapped = map_state_dict(sd, model.state_dict(), where, forward=lambda k: translate(k, forward),
                            backward=lambda n: translate(n, backward), skip=lambda k: is_skipped(kind, k),
                            model=cls_name)
    model.load_state_dict(mapped, strict=True)
    write_folder(model, out, tok)
    return model


#: ``upop import`` kind -> importer ``(checkpoint, out, tokenizer=None) -> model``
IMPORTERS = {kind: (lambda checkpoint, out, tokenizer=None, _kind=kind: import_blip_task(_kind, checkpoint, out, tokenizer))
             for kind in KINDS}

__all__ = ["IMPORTERS", "KINDS", "SKIPPED", "SKIPPED_EXTRA", "SKIPPED_PREFIXES", "TIED", "blip_task_config", "blip_to_hf",
           "guess_kind", "hf_to_blip", "import_blip_task", "is_skipped"]
