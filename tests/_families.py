"""The table the engine tests run over: one tiny model per supported family, its inputs and the
outputs compared between the masked and the pruned model (the forwards and inputs live in
``tests/_forwards.py``, which the no-upop process of ``tests/test_hub_folders.py`` imports too)."""

from __future__ import annotations

import torch

import upop.models.folders as M

from ._forwards import FORWARDS


#: the groups a one-tower model of each modality has: attention and MLP of its 2 layers
VISION = {("attention", "vision"): 2, ("mlp", "vision"): 2}
TEXT = {("attention", "text"): 2, ("mlp", "text"): 2}

#: row -> (builder, expected groups per (kind, modality)): one row per family (and per model class
#: of it the engine tests run); each row's forward is :data:`tests._forwards.FORWARDS` of its name
_ROWS = {
    "clip": (lambda: M.make_model("clip"), {**VISION, **TEXT}),
    "clip-vision": (lambda: _sub("clip", "CLIPVisionModelWithProjection", "vision_config"), VISION),
    "clip-text": (lambda: _sub("clip", "CLIPTextModel", "text_config"), TEXT),
    "blip-retrieval": (lambda: M.make_model("blip-retrieval"), {**VISION, **TEXT, ("attention", "fusion"): 2}),
    "blip-vqa": (lambda: M.make_model("blip-vqa"), {**VISION, **TEXT, ("attention", "fusion"): 2,
                                                    ("attention", "decoder"): 4, ("mlp", "decoder"): 2}),
    "blip-caption": (lambda: M.make_model("blip-caption"), {**VISION, ("attention", "decoder"): 4,
                                                            ("mlp", "decoder"): 2}),
    # two cross-attentions per layer (one per image), each its own group
    "blip-nlvr": (lambda: M.make_model("blip-nlvr"), {**VISION, **TEXT, ("attention", "fusion"): 4}),
    "vit": (lambda: M.make_model("vit"), VISION),
    "vit-model": (lambda: _sub("vit", "ViTModel", None), VISION),
    "deit-teacher": (lambda: M.make_model("deit"), VISION),
    "deit": (lambda: _sub("deit", "DeiTForImageClassification", None), VISION),
    "bert": (lambda: M.make_model("bert"), TEXT),
    "segmenter": (lambda: M.make_model("segmenter"), {**VISION, ("attention", "decoder"): 2, ("mlp", "decoder"): 2}),
    "siglip": (lambda: M.make_model("siglip"), {**VISION, **TEXT}),
    "siglip-vision": (lambda: _sub("siglip", "SiglipVisionModel", "vision_config"), VISION),
    "siglip-text": (lambda: _sub("siglip", "SiglipTextModel", "text_config"), TEXT),
    "siglip-classifier": (lambda: M.make_model("siglip-classifier"), VISION),
    "siglip2": (lambda: M.make_model("siglip2"), {**VISION, **TEXT}),
    "siglip2-vision": (lambda: _sub("siglip2", "Siglip2VisionModel", "vision_config"), VISION),
    "siglip2-text": (lambda: _sub("siglip2", "Siglip2TextModel", "text_config"), TEXT),
    "siglip2-classifier": (lambda: _siglip2_classifier(), VISION),
    "dinov2": (lambda: M.make_model("dinov2"), VISION),
    "dinov2-model": (lambda: _sub("dinov2", "Dinov2Model", None), VISION),
    "llama": (lambda: M.make_model("llama"), TEXT),
    "qwen2": (lambda: M.make_model("qwen2"), TEXT),
    "mistral": (lambda: M.make_model("mistral"), TEXT),
    "qwen3": (lambda: M.make_model("qwen3"), TEXT),
    # vision_feature_layer=-2: the last of the 2 vision layers never reaches the output and is no group
    "llava": (lambda: M.make_model("llava"), {("attention", "vision"): 1, ("mlp", "vision"): 1, **TEXT}),
    "llava-siglip": (lambda: _llava_siglip(), {("attention", "vision"): 1, ("mlp", "vision"): 1, **TEXT}),
}
assert set(FORWARDS) == set(_ROWS), set(FORWARDS) ^ set(_ROWS)  # one forward per row, no other

#: row -> (builder, forward returning a list of float tensors, expected groups per (kind, modality))
FAMILIES = {row: (build, FORWARDS[row], groups) for row, (build, groups) in _ROWS.items()}


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


def _llava_siglip():
    """The tiny LLaVA with the tiny SigLIP's vision tower, whose every patch token reaches the
    language model (``vision_feature_select_strategy="full"``: SigLIP has no class token)."""
    import transformers

    config = M.make_model("llava").config.to_dict()
    config.update(vision_config=M.make_model("siglip").config.vision_config.to_dict(),
                  vision_feature_select_strategy="full")
    torch.manual_seed(0)
    return transformers.LlavaForConditionalGeneration(transformers.LlavaConfig.from_dict(config)).eval()


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
    """Independent count: every weight/bias a unit owns (out-proj / fc2 biases excluded), and where
    channel units are pruned, the weights of the attention's per-head norms (a 1-D weight of
    ``head_dim`` inside the attention module: Qwen3's ``q_norm`` / ``k_norm``)."""
    total = 0
    for g in groups:
        for name in g.producers:
            lin = model.get_submodule(name)
            total += lin.weight.numel() + (lin.bias.numel() if lin.bias is not None else 0)
        total += model.get_submodule(g.consumer).weight.numel()
        if g.kind == "attention" and not g.whole_heads:
            total += sum(p.numel() for n, p in model.get_submodule(g.module).named_parameters()
                         if p.dim() == 1 and p.numel() == g.head_dim and "." in n and n.endswith("weight"))
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


def save_pruned_clip(tmp_path, set_masks, granularity: str | None = None):
    """The tiny CLIP pruned by ``set_masks(masks)`` (groups of ``granularity``) and saved to
    ``tmp_path / "c"``; returns the folder."""
    import upop

    model = FAMILIES["clip"][0]()
    masks = upop.attach_masks(model, upop.find_groups(model, granularity=granularity) if granularity else None)
    set_masks(masks)
    upop.prune(model, masks)
    return upop.save_compressed(model, tmp_path / "c")


def edit_plan(path, fn) -> None:
    """Apply ``fn`` to the folder's ``upop_plan.json`` data and write it back."""
    import json

    file = path / "upop_plan.json"
    data = json.loads(file.read_text())
    fn(data)
    file.write_text(json.dumps(data))
