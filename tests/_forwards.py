"""Fixed inputs and, per row of the tests' family table (``tests/_families.py``), a forward
returning a list of float tensors. Imports only torch: the no-upop child process of
``tests/test_hub_folders.py`` imports this file as it is, where upop cannot be imported."""

from __future__ import annotations

import torch


def ids(batch=2, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(9, 100, (batch, length), generator=g)


def pixels(batch=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(batch, 3, size, size, generator=g)


def naflex(batch=2, seed=0, patches=16, patch=8):
    """SigLIP2 NaFlex image inputs for the tiny model (at most 16 patches of 8 x 8): the first image
    a 4 x 4 grid, the second 3 x 5 (15 patches, the last one padding: zeros, masked out)."""
    g = torch.Generator().manual_seed(seed + 1)
    shapes = torch.tensor([[4, 4], [3, 5]] * batch)[:batch]
    mask = (torch.arange(patches) < shapes.prod(-1, keepdim=True)).long()
    values = torch.randn(batch, patches, 3 * patch * patch, generator=g) * mask[..., None]
    return {"pixel_values": values, "pixel_attention_mask": mask, "spatial_shapes": shapes}


def _mask():
    return torch.ones(2, 12, dtype=torch.long)


def _siglip2(model):
    out = model(input_ids=ids(), attention_mask=_mask(), **naflex())
    return [out.logits_per_image, out.text_embeds, out.image_embeds]


def _pair(model):
    out = model(input_ids=ids(), attention_mask=_mask(), pixel_values=pixels())
    return [out.logits_per_image, out.text_embeds, out.image_embeds]


def _blip_retrieval(model):
    return [model(input_ids=ids(), pixel_values=pixels(), use_itm_head=itm).itm_score for itm in (True, False)]


def _blip_vqa(model):
    image = model.vision_model(pixel_values=pixels()).last_hidden_state
    question = model.text_encoder(input_ids=ids(), encoder_hidden_states=image).last_hidden_state
    logits = model.text_decoder(input_ids=ids(), encoder_hidden_states=question).logits
    return [image, question, logits]


def _blip_caption(model):
    out = model(input_ids=ids(), pixel_values=pixels())
    return [out.logits, out.image_embeds]


def _blip_nlvr(model):
    return [model(input_ids=ids(), pixel_values=torch.stack([pixels(), pixels(seed=5)], dim=1)).logits]


def _logits(model):
    return [model(pixel_values=pixels()).logits]


def _hidden(model):
    return [model(pixel_values=pixels()).last_hidden_state]


def _image_pooled(model):
    return [model(pixel_values=pixels()).pooler_output]


def _text_pooled(model):
    return [model(input_ids=ids()).pooler_output]


def _bert(model):
    return [model(input_ids=ids(), attention_mask=_mask()).logits]


def _causal(model):
    """A decoder LLM: next-token logits of a padded batch (the second row's last 3 tokens are padding)."""
    mask = _mask()
    mask[1, -3:] = 0
    return [model(input_ids=ids(), attention_mask=mask).logits]


def _llava(model):
    """A vision-language decoder: next-token logits of a padded batch whose prompts hold one image's
    tokens (the model's image token, ``image_seq_length`` times) after their first token."""
    config = model.config
    text, image = ids(), torch.full((2, config.image_seq_length), config.image_token_id)
    input_ids = torch.cat([text[:, :1], image, text[:, 1:]], 1)
    mask = torch.ones_like(input_ids)
    mask[1, -3:] = 0
    return [model(input_ids=input_ids, attention_mask=mask, pixel_values=pixels()).logits]


#: row of the family table -> its forward
FORWARDS = {
    "clip": _pair,
    "clip-vision": lambda m: [m(pixel_values=pixels()).image_embeds],
    "clip-text": _text_pooled,
    "blip-retrieval": _blip_retrieval,
    "blip-vqa": _blip_vqa,
    "blip-caption": _blip_caption,
    "blip-nlvr": _blip_nlvr,
    "vit": _logits,
    "vit-model": _hidden,
    "deit-teacher": _logits,
    "deit": _logits,
    "bert": _bert,
    "segmenter": _logits,
    "siglip": _pair,
    "siglip-vision": _image_pooled,
    "siglip-text": _text_pooled,
    "siglip-classifier": _logits,
    "siglip2": _siglip2,
    "siglip2-vision": lambda m: [m(**naflex()).pooler_output],
    "siglip2-text": _text_pooled,
    "siglip2-classifier": lambda m: [m(**naflex()).logits],
    "dinov2": _logits,
    "dinov2-model": _hidden,
    "llama": _causal,
    "qwen2": _causal,
    "mistral": _causal,
    "qwen3": _causal,
    "llava": _llava,
    "llava-siglip": _llava,
}
