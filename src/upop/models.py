"""Small registered models per family, built from configs (no hub access needed).

``make_model("clip", size="tiny")`` returns a randomly initialised model of the family: the
tests use the tiny ones, ``upop make-model`` writes them to a folder with the Shapes tokenizer.
Each entry is a (class, config) pair in one table, like timm's tiny test models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import transformers
from torch import nn

from ._safe_load import (check_dtypes, check_folder, local_folder, quiet_transformers, read_config, reason,
                         scan_safetensors, weight_files)
from .checkpoint import PLAN_FILE, PROJECT_CLASSES, load_compressed, model_class  # noqa: F401 (PROJECT_CLASSES)
from .errors import CheckpointError, ConfigError, show

# Per-size widths: (hidden, layers, heads, intermediate).
_SIZES = {
    "tiny": (32, 2, 4, 64),
    "small": (64, 4, 4, 192),
    "base": (768, 12, 12, 3072),
}


def _clip(size: str, vocab: int, image_size: int) -> nn.Module:
    h, n, heads, inter = _SIZES[size]
    patch = 8 if image_size <= 96 else 16
    cfg = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
            intermediate_size=inter, max_position_embeddings=32, bos_token_id=2, eos_token_id=3, pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, intermediate_size=inter,
            image_size=image_size, patch_size=patch,
        ),
        projection_dim=h,
    )
    return transformers.CLIPModel(cfg)


def _blip_config(size: str, vocab: int, image_size: int):
    h, n, heads, inter = _SIZES[size]
    patch = 8 if image_size <= 96 else 16
    return transformers.BlipConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=h, encoder_hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
            intermediate_size=inter, max_position_embeddings=32, bos_token_id=2, eos_token_id=3, pad_token_id=0,
            sep_token_id=5,
        ),
        vision_config=dict(
            hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, intermediate_size=inter,
            image_size=image_size, patch_size=patch,
            initializer_range=0.02,  # BlipVisionConfig's default 1e-10 leaves a random vision tower at ~0
        ),
        projection_dim=h,
        image_text_hidden_size=h,
    )


def _blip_nlvr(config):
    """BLIP's NLVR layout: layers from the middle on merge their two cross-attentions by a Linear
    (BLIP's 12-layer encoder: from layer 6), so a tiny model has both kinds of layer."""
    from .blip_nlvr import BlipForNLVR

    config.text_config.nlvr_merge_from = config.text_config.num_hidden_layers // 2
    return BlipForNLVR(config)


def _vit_config(cls, size: str, image_size: int, num_labels: int):
    h, n, heads, inter = _SIZES[size]
    return cls(
        hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, intermediate_size=inter,
        image_size=image_size, patch_size=8 if image_size <= 96 else 16, num_labels=num_labels, qkv_bias=True,
    )


def _segmenter(size: str, image_size: int, num_labels: int) -> nn.Module:
    from .segmenter import make_segmenter

    return make_segmenter(*_SIZES[size], image_size=image_size, num_labels=num_labels)


def _bert(size: str, vocab: int, num_labels: int) -> nn.Module:
    h, n, heads, inter = _SIZES[size]
    cfg = transformers.BertConfig(
        vocab_size=vocab, hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
        intermediate_size=inter, max_position_embeddings=32, num_labels=num_labels,
    )
    return transformers.BertForSequenceClassification(cfg)


def _siglip(size: str, vocab: int, image_size: int) -> nn.Module:
    h, n, heads, inter = _SIZES[size]
    common = dict(hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, intermediate_size=inter)
    cfg = transformers.SiglipConfig(
        text_config=dict(vocab_size=vocab, max_position_embeddings=32, bos_token_id=2, eos_token_id=3, pad_token_id=0,
                         projection_size=h, **common),
        vision_config=dict(image_size=image_size, patch_size=8 if image_size <= 96 else 16, **common),
    )
    return transformers.SiglipModel(cfg)


def _siglip2_patches(image_size: int) -> tuple[int, int]:
    """SigLIP2's NaFlex patch size and maximum patch count for ``image_size`` (a square image of
    that side fills the patch budget exactly)."""
    patch = 8 if image_size <= 96 else 16
    return patch, max(1, image_size // patch) ** 2


def _siglip2(size: str, vocab: int, image_size: int) -> nn.Module:
    h, n, heads, inter = _SIZES[size]
    patch, num_patches = _siglip2_patches(image_size)
    common = dict(hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, intermediate_size=inter)
    cfg = transformers.Siglip2Config(
        text_config=dict(vocab_size=vocab, max_position_embeddings=32, bos_token_id=2, eos_token_id=3, pad_token_id=0,
                         projection_size=h, **common),
        vision_config=dict(num_patches=num_patches, patch_size=patch, **common),
    )
    return transformers.Siglip2Model(cfg)


def _dinov2(size: str, image_size: int, num_labels: int) -> nn.Module:
    h, n, heads, inter = _SIZES[size]
    cfg = transformers.Dinov2Config(
        hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, mlp_ratio=inter // h, image_size=image_size,
        patch_size=8 if image_size <= 96 else 16, num_labels=num_labels,
    )
    return transformers.Dinov2ForImageClassification(cfg)


_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "clip": lambda size, vocab, image_size, num_labels: _clip(size, vocab, image_size),
    "blip-retrieval": lambda size, vocab, image_size, num_labels: transformers.BlipForImageTextRetrieval(
        _blip_config(size, vocab, image_size)
    ),
    "blip-vqa": lambda size, vocab, image_size, num_labels: transformers.BlipForQuestionAnswering(
        _blip_config(size, vocab, image_size)
    ),
    "blip-caption": lambda size, vocab, image_size, num_labels: transformers.BlipForConditionalGeneration(
        _blip_config(size, vocab, image_size)
    ),
    "blip-nlvr": lambda size, vocab, image_size, num_labels: _blip_nlvr(_blip_config(size, vocab, image_size)),
    "vit": lambda size, vocab, image_size, num_labels: transformers.ViTForImageClassification(
        _vit_config(transformers.ViTConfig, size, image_size, num_labels)
    ),
    "deit": lambda size, vocab, image_size, num_labels: transformers.DeiTForImageClassificationWithTeacher(
        _vit_config(transformers.DeiTConfig, size, image_size, num_labels)
    ),
    "bert": lambda size, vocab, image_size, num_labels: _bert(size, vocab, num_labels),
    "segmenter": lambda size, vocab, image_size, num_labels: _segmenter(size, image_size, num_labels),
    "siglip": lambda size, vocab, image_size, num_labels: _siglip(size, vocab, image_size),
    "siglip2": lambda size, vocab, image_size, num_labels: _siglip2(size, vocab, image_size),
    "dinov2": lambda size, vocab, image_size, num_labels: _dinov2(size, image_size, num_labels),
}

FAMILIES = tuple(_FACTORIES)


def make_model(
    family: str, size: str = "tiny", vocab_size: int = 128, image_size: int = 32, num_labels: int = 10, seed: int = 0
) -> nn.Module:
    """A randomly initialised model of ``family`` (one of :data:`FAMILIES`) at ``size``."""
    if family not in _FACTORIES:
        raise ConfigError(f"unknown model family {family!r}; choose one of: {', '.join(FAMILIES)}")
    if size not in _SIZES:
        raise ConfigError(f"unknown size {size!r}; choose one of: {', '.join(_SIZES)}")
    torch.manual_seed(seed)
    model = _FACTORIES[family](size, vocab_size, image_size, num_labels)
    return model.eval()


def _clip_processor(image_size: int, tokenizer):
    from .data.retrieval import make_clip_processor

    return make_clip_processor(image_size, tokenizer)


def _blip_processor(image_size: int, tokenizer):
    from transformers import BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    return BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _siglip_processor(image_size: int, tokenizer):
    from transformers import SiglipProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    return SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _siglip2_processor(image_size: int, tokenizer):
    """A ``Siglip2Processor`` with the PIL NaFlex image processor (no torchvision): each image is
    resized, keeping its aspect ratio, to at most the model's ``num_patches`` patches and padded
    to that count (``pixel_values`` (B, num_patches, 3 * p * p), ``pixel_attention_mask``,
    ``spatial_shapes``)."""
    from transformers import Siglip2Processor
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    patch, num_patches = _siglip2_patches(image_size)
    image_processor = Siglip2ImageProcessorPil(patch_size=patch, max_num_patches=num_patches)
    return Siglip2Processor(image_processor=image_processor, tokenizer=tokenizer)


def _vit_processor(image_size: int, tokenizer):
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    return ViTImageProcessorPil(size={"height": image_size, "width": image_size})


#: family -> processor builder ``(image_size, shapes_tokenizer) -> processor`` used by make-model
PROCESSORS: dict[str, Callable] = {
    "clip": _clip_processor,
    "blip-retrieval": _blip_processor,
    "blip-vqa": _blip_processor,
    "blip-caption": _blip_processor,
    "blip-nlvr": _blip_processor,
    "vit": _vit_processor,
    "deit": _vit_processor,
    "segmenter": _vit_processor,
    "siglip": _siglip_processor,
    "siglip2": _siglip2_processor,
    "dinov2": _vit_processor,
    "bert": lambda image_size, tokenizer: tokenizer,
}


def make_processor(family: str, image_size: int):
    """The processor of ``family`` for the Shapes world: Shapes tokenizer and/or a PIL image processor."""
    from .data.tokenizer import build_shapes_tokenizer

    return PROCESSORS[family](image_size, build_shapes_tokenizer())


def _shapes_labels(family: str) -> int | None:
    """Classes of the Shapes data set a family's head is for (None: the factory default)."""
    from .data import shapes_vision

    return {"segmenter": len(shapes_vision.SEGMENTATION_CLASSES),
            "vit": len(shapes_vision.CLASSIFICATION_CLASSES),
            "deit": len(shapes_vision.CLASSIFICATION_CLASSES),
            "dinov2": len(shapes_vision.CLASSIFICATION_CLASSES)}.get(family)


def shapes_class_names(family: str) -> list[str] | None:
    """The class names of the Shapes data set a family's head is for, in the order the data set's
    reader numbers them (ImageFolder: sorted folder names; segmentation: ``classes.json``), or None."""
    from .data import shapes_vision

    if family == "segmenter":
        return list(shapes_vision.SEGMENTATION_CLASSES)
    if family in ("vit", "deit", "dinov2"):
        return sorted(shapes_vision.class_name(c, k) for c, k in shapes_vision.CLASSIFICATION_CLASSES)
    return None


def make_model_folder(family: str, out_dir, size: str = "tiny", image_size: int = 64, seed: int = 0,
                      num_labels: int | None = None):
    """Write a randomly initialised ``family`` model with the Shapes tokenizer/processor to ``out_dir``
    (a folder that ``from_pretrained`` and ``upop compress --model`` read).

    Without ``num_labels``, a classifier / segmenter gets the classes of its Shapes data set, named
    in ``config.id2label`` / ``label2id`` (so pipelines show ``"red_circle"``, not ``LABEL_0``); with
    ``num_labels`` its classes keep transformers' ``LABEL_i`` names, which the first data set it is
    trained or evaluated on replaces with its own (:mod:`upop.data.labels`)."""
    if family not in _FACTORIES:
        raise ConfigError(f"unknown model family {family!r}; choose one of: {', '.join(FAMILIES)}")
    processor = make_processor(family, image_size)
    tokenizer = getattr(processor, "tokenizer", processor)
    vocab = len(tokenizer) if hasattr(tokenizer, "get_vocab") else 128
    names = shapes_class_names(family) if num_labels is None else None
    if num_labels is None:
        num_labels = _shapes_labels(family)
    labels = {} if num_labels is None else {"num_labels": num_labels}  # classifier / segmenter classes
    model = make_model(family, size=size, vocab_size=vocab, image_size=image_size, seed=seed, **labels)
    if names is not None:
        from .data.labels import name_classes

        name_classes(model.config, names)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return model, processor


def load_any(path: str | Path) -> tuple[nn.Module, object]:
    """Load a dense Hugging Face folder or a upop compressed folder, with its processor.

    ``path`` is a local folder or a Hugging Face Hub id. Returns ``(model, processor)``; the
    processor is None if the folder has none. No code from the folder is ever run and weights
    come from safetensors only (:mod:`upop._safe_load`).
    """
    transformers.utils.logging.disable_progress_bar()
    folder = local_folder(path)
    model = load_compressed(folder) if (folder / PLAN_FILE).is_file() else _load_dense(folder)
    return model, load_processor_or_none(folder)


def _load_dense(folder: Path) -> nn.Module:
    """A dense Hugging Face model folder, checked before and after ``from_pretrained``.

    Before: nothing in the folder asks for its own code, ``config.json`` names a class upop
    knows and holds that class's config, and the safetensors weights are readable and finite.
    After: no tensor was missing or of another shape (transformers would leave those randomly
    initialised) and none was cast from bool/integer to float.
    """
    archs = check_folder(folder).get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise CheckpointError(f"{show(folder)}: config.json names no model class (architectures is "
                              f"{show(archs, 80)})")
    cls = model_class(archs[0])
    found = scan_safetensors(weight_files(folder, cls))
    config = read_config(folder, cls)
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(str(folder), config=config, use_safetensors=True, trust_remote_code=False,
                                              ignore_mismatched_sizes=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load model {show(folder)}: {reason(exc)}") from None
    _check_loading_info(info, folder, cls)
    check_dtypes(found, model.state_dict())
    return model.eval()


def _check_loading_info(info: dict, folder: Path, cls: type) -> None:
    """Refuse weights of another shape or with tensors missing (``from_pretrained``'s report)."""
    mismatched = sorted(info["mismatched_keys"])
    if mismatched:
        key, stored, own = mismatched[0]
        raise CheckpointError(f"{show(folder)}: tensor {show(key, 120)} has shape {tuple(stored)} but a {cls.__name__} "
                              f"with this config.json has {tuple(own)} ({len(mismatched)} tensor(s) differ): the "
                              "weights are of a different-size model")
    missing = sorted(info["missing_keys"])
    if missing:
        raise CheckpointError(f"{show(folder)}: the weights have no tensor {show(missing[0], 120)} (and "
                              f"{len(missing) - 1} more) that {cls.__name__} needs")


def load_processor_or_none(path: str | Path):
    """The processor saved in ``path`` (PIL image backend, no torchvision), or None.

    Never runs code from the folder (``trust_remote_code=False``).
    """
    try:
        return transformers.AutoProcessor.from_pretrained(str(path), backend="pil", trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError):
        pass
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    # a folder without tokenizer files can still give an empty tokenizer of only its special tokens
    return tokenizer if len(tokenizer) > len(tokenizer.all_special_tokens) else None
