"""``BlipForNLVR``: BLIP's NLVR2 model (two images, one statement, true/false) on transformers' BLIP parts.

transformers has no BLIP NLVR2 class. This one follows BLIP's ``models/blip_nlvr.py`` and
``models/nlvr_encoder.py`` (salesforce/BLIP):

- the vision tower (``BlipVisionModel``) encodes both images;
- the text encoder is BERT whose every layer runs self-attention, then TWO cross-attentions
  (``crossattention.self0`` reads image 0, ``crossattention.self1`` image 1, both queried by the
  same self-attention output), each with its own output projection (``output.dense0``,
  ``output.dense1``). Layers with index below ``text_config.nlvr_merge_from`` (BLIP: 6) average
  the two projections; the others concatenate them and apply ``output.merge_layer``
  (``Linear(2H, H)``, no activation: BLIP builds an ``act`` there but never calls it). Dropout and
  the residual ``LayerNorm`` follow, then the MLP;
- ``cls_head`` (``Linear(H, H)``, ReLU, ``Linear(H, 2)``) classifies the ``[CLS]``-position output
  into ``(false, true)``.

BLIP overwrites the first token with the tokenizer's ``[ENC]`` id; set
``text_config.nlvr_enc_token_id`` to do the same (None: ``input_ids`` are used as given).
Parameter names equal BLIP's for the text encoder and head, so BLIP checkpoints map by name
(:mod:`upop.models.importers`). Every attention runs eager math; ``attn_implementation="sdpa"`` falls back
to it.

Input: ``pixel_values`` of shape ``(B, 2, 3, H, W)`` (left image first), ``input_ids``
``(B, L)``, optional ``attention_mask`` and ``labels`` ``(B,)`` with 1 = true.
"""

import math

import torch
from torch import nn
from transformers import BlipConfig
from transformers import initialization as init
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.blip.modeling_blip import BlipPreTrainedModel, BlipVisionModel
from transformers.models.blip.modeling_blip_text import (BlipTextAttention, BlipTextEmbeddings,
                                                         BlipTextIntermediate, BlipTextOutput,
                                                         BlipTextSelfAttention)

#: BLIP's NLVR encoder merges the two cross-attentions with a Linear from this layer index on
MERGE_FROM = 6


def merge_from(text_config) -> int:
    """First text layer whose two cross-attention outputs are merged by ``merge_layer``."""
    value = getattr(text_config, "nlvr_merge_from", None)
    return MERGE_FROM if value is None else int(value)


def twin_cross_attention(state: dict) -> dict:
    """``state`` with each single cross-attention (``crossattention.self.*``, ``crossattention.output.dense.*``
    of a BLIP retrieval / VQA text encoder) copied to both of BlipForNLVR's (``self0``/``self1``,
    ``dense0``/``dense1``), as BLIP's NLVR ``load_checkpoint`` does; ``merge_layer`` keeps its init."""
    out = {}
    for key, value in state.items():
        if ".crossattention.self." in key:
            for k in (0, 1):
                out[key.replace(".crossattention.self.", f".crossattention.self{k}.")] = value
        elif ".crossattention.output.dense." in key:
            for k in (0, 1):
                out[key.replace(".crossattention.output.dense.", f".crossattention.output.dense{k}.")] = value
        else:
            out[key] = value
    return out


class NLVRTwinOutput(nn.Module):
    """Projects the two cross-attention contexts and combines them (mean, or ``merge_layer``)."""

    def __init__(self, config, merge: bool):
        super().__init__()
        hidden = config.hidden_size
        self.dense0 = nn.Linear(hidden, hidden)
        self.dense1 = nn.Linear(hidden, hidden)
        if merge:
            self.merge_layer = nn.Linear(2 * hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, context0: torch.Tensor, context1: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        out0, out1 = self.dense0(context0), self.dense1(context1)
        if hasattr(self, "merge_layer"):
            out = self.merge_layer(torch.cat([out0, out1], dim=-1))
        else:
            out = (out0 + out1) / 2
        return self.LayerNorm(self.dropout(out) + residual)


class NLVRCrossAttention(nn.Module):
    """Two cross-attentions (one per image) on the same text states, combined by :class:`NLVRTwinOutput`."""

    def __init__(self, config, layer_idx: int, merge: bool):
        super().__init__()
        self.self0 = BlipTextSelfAttention(config, is_cross_attention=True, layer_idx=layer_idx)
        self.self1 = BlipTextSelfAttention(config, is_cross_attention=True, layer_idx=layer_idx)
        self.output = NLVRTwinOutput(config, merge)

    def forward(self, hidden_states, image0, image1):
        context0, probs0 = self.self0(hidden_states, encoder_hidden_states=image0)
        context1, probs1 = self.self1(hidden_states, encoder_hidden_states=image1)
        return self.output(context0, context1, hidden_states), (probs0, probs1)


class NLVRTextLayer(nn.Module):
    """Self-attention, the two cross-attentions, MLP (``intermediate`` / ``output``)."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.attention = BlipTextAttention(config, layer_idx=layer_idx)
        self.crossattention = NLVRCrossAttention(config, layer_idx, merge=layer_idx >= merge_from(config))
        self.intermediate = BlipTextIntermediate(config)
        self.output = BlipTextOutput(config)

    def forward(self, hidden_states, attention_mask, image0, image1):
        attended, self_probs = self.attention(hidden_states, attention_mask=attention_mask)
        attended, cross_probs = self.crossattention(attended, image0, image1)
        return self.output(self.intermediate(attended), attended), self_probs, cross_probs


class NLVRTextEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList([NLVRTextLayer(config, i) for i in range(config.num_hidden_layers)])


class NLVRTextModel(nn.Module):
    """BLIP's NLVR text encoder: embeddings and :class:`NLVRTextLayer` s (no pooler)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = BlipTextEmbeddings(config)
        self.encoder = NLVRTextEncoder(config)

    def forward(self, input_ids, attention_mask, image0, image1, output_attentions=False,
                output_hidden_states=False):
        """``(last_hidden_state, hidden_states or None, self-attentions or None, cross-attention pairs or None)``."""
        # explicit positions: from_pretrained leaves the non-persistent position_ids buffer unset here
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        hidden = self.embeddings(input_ids=input_ids, position_ids=positions)
        mask = None
        if attention_mask is not None:
            keep = attention_mask[:, None, None, :].to(hidden.dtype)
            mask = (1.0 - keep) * torch.finfo(hidden.dtype).min
        states, selfs, crosses = [hidden], [], []
        for layer in self.encoder.layer:
            hidden, self_probs, cross_probs = layer(hidden, mask, image0, image1)
            states.append(hidden)
            selfs.append(self_probs)
            crosses.append(cross_probs)
        return (hidden, tuple(states) if output_hidden_states else None,
                tuple(selfs) if output_attentions else None, tuple(crosses) if output_attentions else None)


class BlipForNLVR(BlipPreTrainedModel):
    """Two-image true/false classifier: vision tower, two-cross-attention text encoder, ``cls_head``.

    ``output_hidden_states`` / ``output_attentions`` return the text encoder's (embeddings plus
    every layer; self-attention probabilities).
    """

    config: BlipConfig
    main_input_name = "pixel_values"

    def __init__(self, config: BlipConfig):
        super().__init__(config)
        for sub in (config.vision_config, config.text_config):
            sub._attn_implementation = "eager"  # BLIP's towers have no other path (would refuse "sdpa")
        self.vision_model = BlipVisionModel(config.vision_config)
        self.text_encoder = NLVRTextModel(config.text_config)
        hidden = config.text_config.hidden_size
        self.cls_head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2))
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, nn.Linear) and any(module is m for m in getattr(self, "cls_head", ())):
            # BLIP builds cls_head as plain nn.Linear layers: PyTorch's default init, not std 0.02
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            init.uniform_(module.bias, -1 / math.sqrt(module.in_features), 1 / math.sqrt(module.in_features))

    def get_correct_attn_implementation(self, requested_attention, is_init_check: bool = False) -> str:
        # every attention here runs eager math, so "sdpa" (the default) is served by eager
        if requested_attention == "sdpa":
            requested_attention = "eager"
        return super().get_correct_attn_implementation(requested_attention, is_init_check)

    def get_input_embeddings(self):
        return self.text_encoder.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.text_encoder.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        if pixel_values.dim() != 5 or pixel_values.shape[1] != 2:
            raise ValueError(f"BlipForNLVR: pixel_values must have shape (batch, 2, 3, H, W), got {tuple(pixel_values.shape)}")
        enc = getattr(self.config.text_config, "nlvr_enc_token_id", None)
        if enc is not None:
            input_ids = input_ids.clone()
            input_ids[:, 0] = enc
        batch = pixel_values.shape[0]
        images = self.vision_model(pixel_values=pixel_values.flatten(0, 1)).last_hidden_state
        images = images.view(batch, 2, *images.shape[1:])
        hidden, states, attentions, _ = self.text_encoder(
            input_ids, attention_mask, images[:, 0], images[:, 1],
            output_attentions=bool(output_attentions if output_attentions is not None else self.config.output_attentions),
            output_hidden_states=bool(output_hidden_states if output_hidden_states is not None
                                      else self.config.output_hidden_states))
        logits = self.cls_head(hidden[:, 0, :])
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=states, attentions=attentions)


__all__ = ["BlipForNLVR", "MERGE_FROM", "merge_from", "twin_cross_attention"]
