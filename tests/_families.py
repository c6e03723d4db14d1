"""The table the engine tests run over: one tiny model per supported family, its inputs and the
outputs compared between the masked and the pruned model."""

from __future__ import annotations

import torch

import upop.models.folders as M


def _ids(batch=2, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(9, 100, (batch, length), generator=g)


def _pixels(batch=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(batch, 3, size, size, generator=g)


def _naflex(batch=2, seed=0, patches=16, patch=8):
    """SigLIP2 NaFlex image inputs for the tiny model (at most 16 patches of 8 x 8): the first image
    a 4 x 4 grid, the second 3 x 5 (15 patches, the last one padding: zeros, masked out)."""
    g = torch.Generator().manual_seed(seed + 1)
    shapes = torch.tensor([[4, 4], [3, 5]] * batch)[:batch]
    mask = (torch.arange(patches) < shapes.prod(-1, keepdim=True)).long()
    pixels = torch.randn(batch, patches, 3 * patch * patch, generator=g) * mask[..., None]
    return {"pixel_values": pixels, "pixel_attention_mask": mask, "spatial_shapes": shapes}


def _siglip2(model):
    out = model(input_ids=_ids(), attention_mask=torch.ones(2, 12, dtype=torch.long), **_naflex())
    return [out.logits_per_image, out.text_embeds, out.image_embeds]


def _clip(model):
    out = model(input_ids=_ids(), attention_mask=torch.ones(2, 12, dtype=torch.long), pixel_values=_pixels())
    return [out.logits_per_image, out.text_embeds, out.image_embeds]


def _blip_retrieval(model):
    ids, px = _ids(), _pixels()
    itm = model(input_ids=ids, pixel_values=px, use_itm_head=True).itm_score
    itc = model(input_ids=ids, pixel_values=px, use_itm_head=False).itm_score
    return [itm, itc]


def _blip_vqa(model):
    ids, px = _ids(), _pixels()
    image = model.vision_model(pixel_values=px).last_hidden_state
    question = model.text_encoder(input_ids=ids, encoder_hidden_states=image).last_hidden_state
    logits = model.text_decoder(input_ids=ids, encoder_hidden_states=question).logits
    return [image, question, logits]


def _blip_caption(model):
    out = model(input_ids=_ids(), pixel_values=_pixels())
    return [out.logits, out.image_embeds]


def _vision_classifier(model):
    out = model(pixel_values=_pixels())
    return [out.logits]


def _bert(model):
    return [model(input_ids=_ids(), attention_mask=torch.ones(2, 12, dtype=torch.long)).logits]


# family -> (builder, forward returning a list of float tensors, expected groups per (kind, modality))
FAMILIES = {
    "clip": (lambda: M.make_model("clip"), _clip, {("attention", "vision"): 2, ("mlp", "vision"): 2, ("attention", "text"): 2, ("mlp", "text"): 2}),
    "clip-vision": (
        lambda: _sub("clip", "CLIPVisionModelWithProjection", "vision_config"),
        lambda m: [m(pixel_values=_pixels()).image_embeds],
        {("attention", "vision"): 2, ("mlp", "vision"): 2},
    ),
    "clip-text": (
        lambda: _sub("clip", "CLIPTextModel", "text_config"),
        lambda m: [m(input_ids=_ids()).pooler_output],
        {("attention", "text"): 2, ("mlp", "text"): 2},
    ),
    "blip-retrieval": (
        lambda: M.make_model("blip-retrieval"),
        _blip_retrieval,
        {("attention", "vision"): 2, ("mlp", "vision"): 2, ("attention", "text"): 2, ("attention", "fusion"): 2, ("mlp", "text"): 2},
    ),
    "blip-vqa": (
        lambda: M.make_model("blip-vqa"),
        _blip_vqa,
        {("attention", "vision"): 2, ("mlp", "vision"): 2, ("attention", "text"): 2, ("attention", "fusion"): 2,
         ("mlp", "text"): 2, ("attention", "decoder"): 4, ("mlp", "decoder"): 2},
    ),
    "blip-caption": (
        lambda: M.make_model("blip-caption"),
        _blip_caption,
        {("attention", "vision"): 2, ("mlp", "vision"): 2, ("attention", "decoder"): 4, ("mlp", "decoder"): 2},
    ),
    "blip-nlvr": (
        lambda: M.make_model("blip-nlvr"),
        lambda m: [m(input_ids=_ids(), pixel_values=torch.stack([_pixels(), _pixels(seed=5)], dim=1)).logits],
        # two cross-attentions per layer (one per image), each its own group
        {("attention", "vision"): 2, ("mlp", "vision"): 2, ("attention", "text"): 2, ("attention", "fusion"): 4, ("mlp", "text"): 2},
    ),
    "vit": (lambda: M.make_model("vit"), _vision_classifier, {("attention", "vision"): 2, ("mlp", "vision"): 2}),
    "vit-model": (
        lambda: _sub("vit", "ViTModel", None),
        lambda m: [m(pixel_values=_pixels()).last_hidden_state],
        {("attention", "vision"): 2, ("mlp", "vision"): 2},
    ),
    "deit-teacher": (lambda: M.make_model("deit"), _vision_classifier, {("attention", "vision"): 2, ("mlp", "vision"): 2}),
    "deit": (
        lambda: _sub("deit", "DeiTForImageClassification", None),
        _vision_classifier,
        {("attention", "vision"): 2, ("mlp", "vision"): 2},
    ),
    "bert": (lambda: M.make_model("bert"), _bert, {("attention", "text"): 2, ("mlp", "text"): 2}),
    "segmenter": (
        lambda: M.make_model("segmenter"),
        lambda m: [m(pixel_values=_pixels()).logits],
        {("attention", "vision"): 2, ("mlp", "vision"): 2, ("attention", "decoder"): 2, ("mlp", "decoder"): 2},
    ),
    "siglip": (lambda: M.make_model("siglip"), _clip, {("attention", "vision"): 2, ("mlp", "vision"): 2, ("attention", "text"): 2, ("mlp", "text"): 2}),
    "siglip-vision": (
        lambda: _sub("siglip", "SiglipVisionModel", "vision_config"),
        lambda m: [m(pixel_values=_pixels()).pooler_output],
        {("attention", "vision"): 2, ("mlp", "vision"): 2},
    ),
    "siglip-text": (
        lambda: _sub("siglip", "SiglipTextModel", "text_config"),
        lambda m: [m(input_ids=_ids()).pooler_output],
        {("attention", "text"): 2, ("mlp", "text"): 2},
    ),
    "siglip-classifier": (lambda: M.make_model("siglip-classifier"), _vision_classifier,
                          {("attention", "vision"): 2, ("mlp", "vision"): 2}),
    "siglip2": (lambda: M.make_model("siglip2"), _siglip2, {("attention", "vision"): 2, ("mlp", "vision"): 2, ("attention", "text"): 2, ("mlp", "text"): 2}),
    "siglip2-vision": (
        lambda: _sub("siglip2", "Siglip2VisionModel", "vision_config"),
        lambda m: [m(**_naflex()).pooler_output],
        {("attention", "vision"): 2, ("mlp", "vision"): 2},
    ),
    "siglip2-text": (
        lambda: _sub("siglip2", "Siglip2TextModel", "text_config"),
        lambda m: [m(input_ids=_ids()).pooler_output],
        {("attention", "text"): 2, ("mlp", "text"): 2},
    ),
    "siglip2-classifier": (
        lambda: _siglip2_classifier(),
        lambda m: [m(**_naflex()).logits],
        {("attention", "vision"): 2, ("mlp", "vision"): 2},
    ),
    "dinov2": (lambda: M.make_model("dinov2"), _vision_classifier, {("attention", "vision"): 2, ("mlp", "vision"): 2}),
    "dinov2-model": (
        lambda: _sub("dinov2", "Dinov2Model", None),
        lambda m: [m(pixel_values=_pixels()).last_hidden_state],
        {("attention", "vision"): 2, ("mlp", "vision"): 2},
    ),
}


#: the row of the table above that builds each registered tiny model (``upop.arch.TINY``), where
#: the row is not named after it
_ROW_OF_TINY = {"deit": "deit-teacher"}


def row_of(tiny: str) -> str:
    """The row of :data:`FAMILIES` that is the registered tiny model ``tiny``."""
    return _ROW_OF_TINY.get(tiny, tiny)


def _sub(family: str, cls_name: str, sub_config: str | None):
    import transformers

    base = M.make_model(family)
    cfg = getattr(base.config, sub_config) if sub_config else base.config
    torch.manual_seed(0)
    return getattr(transformers, cls_name)(cfg).eval()


def _siglip2_classifier():
    """A Siglip2ForImageClassification of the tiny SigLIP2's sizes, from a fresh config (it has no
    text tower, so its text config keeps no attention implementation, as after from_pretrained)."""
    import transformers

    config = transformers.Siglip2Config.from_dict(M.make_model("siglip2").config.to_dict())
    torch.manual_seed(0)
    return transformers.Siglip2ForImageClassification(config).eval()


def prune_every_third(model):
    """Prune ``model`` in place by a fixed 0/1 mask dropping every third unit of every group (the
    first unit always kept); returns the model."""
    import upop

    masks = upop.attach_masks(model)
    with torch.no_grad():
        for _, m in masks.items():
            keep = torch.ones(m.numel())
            keep[1::3] = 0.0
            m.copy_(keep)
    upop.prune(model, masks)
    return model


def prunable_params(model, groups) -> int:
    """Independent count: every weight/bias a unit owns (out-proj / fc2 biases excluded)."""
    total = 0
    for g in groups:
        for name in g.producers:
            lin = model.get_submodule(name)
            total += lin.weight.numel() + (lin.bias.numel() if lin.bias is not None else 0)
        total += model.get_submodule(g.consumer).weight.numel()
    return total


def clip_world(root, train: int = 64, val: int = 16, test: int = 16):
    """A tiny Shapes retrieval data set (``root/data``) and a tiny random CLIP (``root/model``),
    written through the CLI as a user would. ``train`` counts training samples (image-caption
    pairs: ``train // 2`` images of 2 captions); ``val`` and ``test`` count images."""
    from upop.cli.main import main

    assert main(["data", "shapes", "--task", "retrieval", "--out", str(root / "data"), "--train", str(train // 2),
                 "--val", str(val), "--test", str(test), "--image-size", "32"]) == 0
    assert main(["make-model", "clip", "--out", str(root / "model"), "--size", "tiny", "--image-size", "32"]) == 0
    return root


def largest_chunk_share(model_dir, report) -> float:
    """How far a run may overshoot its budget: one chunk of ``round_to`` units (the report says which
    multiple the run used; ``"auto"`` by default) of the costliest group, as a share of the
    prunable cost."""
    import upop

    groups = upop.find_groups(upop.load_model(model_dir)[0])
    return report["round_to"]["used"] * max(g.param_cost for g in groups) / upop.prunable_cost(groups)
