"""``BlipForNLVR``: BLIP for NLVR2 (two images, one statement, true/false) built from BLIP parts.

transformers has no BLIP NLVR2 class. The BLIP paper's NLVR2 model gives each text-encoder
layer two cross-attention blocks (one per image, sharing weights at init) and merges them.
This class takes the simplest faithful variant: the same text encoder (self-attention, then
cross-attention into the image, then MLP) reads the statement twice, once against each image,
and an MLP head classifies the concatenation of the two ``[CLS]``-position outputs into
``(false, true)``. Every pruned group (vision, text self-attention, fusion cross-attention,
MLPs) is then shared by both images, exactly like the BLIP spec's retrieval/VQA encoders.

Module paths match the BLIP spec (``vision_model.encoder.layers``, ``text_encoder.encoder.layer``),
``config.model_type`` stays ``"blip"`` (it is a :class:`~transformers.BlipConfig`), and
``save_pretrained`` / ``from_pretrained`` work on a local folder.

Input: ``pixel_values`` of shape ``(B, 2, 3, H, W)`` (left image first), ``input_ids``
``(B, L)``, optional ``attention_mask`` and ``labels`` ``(B,)`` with 1 = true.
"""

import torch
from torch import nn
from transformers import BlipConfig
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.blip.modeling_blip import BlipPreTrainedModel, BlipVisionModel
from transformers.models.blip.modeling_blip_text import BlipTextModel


class BlipForNLVR(BlipPreTrainedModel):
    """Two-image true/false classifier: vision tower, text encoder with cross-attention, MLP head."""

    config: BlipConfig
    main_input_name = "pixel_values"

    def __init__(self, config: BlipConfig):
        super().__init__(config)
        self.vision_model = BlipVisionModel(config.vision_config)
        self.text_encoder = BlipTextModel(config.text_config, add_pooling_layer=False)
        hidden = config.text_config.hidden_size
        self.cls_head = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2))
        self.post_init()

    def get_input_embeddings(self):
        return self.text_encoder.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.text_encoder.set_input_embeddings(value)

    def forward(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        if pixel_values.dim() != 5 or pixel_values.shape[1] != 2:
            raise ValueError(f"BlipForNLVR: pixel_values must have shape (batch, 2, 3, H, W), got {tuple(pixel_values.shape)}")
        batch = pixel_values.shape[0]
        images = self.vision_model(pixel_values=pixel_values.flatten(0, 1)).last_hidden_state
        images = images.view(batch, 2, *images.shape[1:])
        image_mask = torch.ones(images.shape[2:-1], dtype=torch.long, device=images.device).expand(batch, -1)
        cls = []
        for k in (0, 1):
            out = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                    encoder_hidden_states=images[:, k], encoder_attention_mask=image_mask)
            cls.append(out.last_hidden_state[:, 0, :])
        logits = self.cls_head(torch.cat(cls, dim=-1))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


__all__ = ["BlipForNLVR"]
