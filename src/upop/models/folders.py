"""Loading model folders, and the registered tiny models per family (no hub access needed).

``make_model("clip", size="tiny")`` returns a randomly initialised model of the family: the
tests use the tiny ones, ``upop make-model`` writes them to a folder with the Shapes tokenizer.
Each family declares its tiny models in its own module (:class:`upop.arch.TinyModel`), like
timm's registered test models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import transformers
from torch import nn

from upop.checkpoint.safe_load import (check_dtypes, check_folder, local_folder, quiet_transformers, read_config, reason,
                         scan_safetensors, weight_files)
from upop.arch import SIZES as _SIZES
from upop.arch import TINY
from upop.checkpoint.folder import PLAN_FILE, load_compressed, model_class
from upop.errors import CheckpointError, ConfigError, show

FAMILIES = tuple(TINY)
"""The families ``make-model`` builds: every tiny model the registry declares (:mod:`upop.arch`)."""
SIZES = tuple(_SIZES)


def _tiny(family: str):
    if family not in TINY:
        raise ConfigError(f"unknown model family {show(family)}; choose one of: {', '.join(FAMILIES)}")
    return TINY[family]


def make_model(
    family: str, size: str = "tiny", vocab_size: int = 128, image_size: int = 32, num_labels: int = 10, seed: int = 0
) -> nn.Module:
    """A randomly initialised model of ``family`` (one of :data:`FAMILIES`) at ``size``."""
    tiny = _tiny(family)
    if size not in _SIZES:
        raise ConfigError(f"unknown size {show(size)}; choose one of: {', '.join(_SIZES)}")
    torch.manual_seed(seed)
    return tiny.build(_SIZES[size], vocab_size, image_size, num_labels).eval()


def make_processor(family: str, image_size: int):
    """The processor of ``family`` for the Shapes world: Shapes tokenizer and/or a PIL image processor."""
    from upop.data.tokenizer import build_shapes_tokenizer

    return _tiny(family).processor(image_size, build_shapes_tokenizer())


def shapes_class_names(family: str) -> list[str] | None:
    """The class names of the Shapes data set a family's head is for, in the order the data set's
    reader numbers them (ImageFolder: sorted folder names; segmentation: ``classes.json``), or None."""
    names = _tiny(family).class_names
    return None if names is None else list(names())


def _shapes_labels(family: str) -> int | None:
    """Classes of the Shapes data set a family's head is for (None: the factory default)."""
    names = shapes_class_names(family)
    return None if names is None else len(names)


def make_model_folder(family: str, out_dir, size: str = "tiny", image_size: int = 64, seed: int = 0,
                      num_labels: int | None = None):
    """Write a randomly initialised ``family`` model with the Shapes tokenizer/processor to ``out_dir``
    (a folder that ``from_pretrained`` and ``upop compress --model`` read).

    Without ``num_labels``, a classifier / segmenter gets the classes of its Shapes data set, named
    in ``config.id2label`` / ``label2id`` (so pipelines show ``"red_circle"``, not ``LABEL_0``); with
    ``num_labels`` its classes keep transformers' ``LABEL_i`` names, which the first data set it is
    trained or evaluated on replaces with its own (:mod:`upop.data.labels`)."""
    processor = make_processor(family, image_size)
    tokenizer = getattr(processor, "tokenizer", processor)
    vocab = len(tokenizer) if hasattr(tokenizer, "get_vocab") else 128
    names = shapes_class_names(family) if num_labels is None else None
    if num_labels is None:
        num_labels = _shapes_labels(family)
    labels = {} if num_labels is None else {"num_labels": num_labels}  # classifier / segmenter classes
    model = make_model(family, size=size, vocab_size=vocab, image_size=image_size, seed=seed, **labels)
    if names is not None:
        from upop.data.labels import name_classes

        name_classes(model.config, names)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return model, processor


def load_any(path: str | Path) -> tuple[nn.Module, object]:
    """Load a dense Hugging Face folder or a upop compressed folder, with its processor.

    ``path`` is a local folder or a Hugging Face Hub id. Returns ``(model, processor)``; the
    processor is None if the folder has none. No code from the folder is ever run and weights
    come from safetensors only (:mod:`upop.checkpoint.safe_load`).
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
    config_json = check_folder(folder)
    archs = config_json.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise CheckpointError(f"{show(folder)}: config.json names no model class (architectures is "
                              f"{show(archs, 80)})")
    cls = model_class(archs[0])
    found = scan_safetensors(weight_files(folder, cls))
    config = read_config(folder, cls, config_json)
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

    Never runs code from the folder (``trust_remote_code=False``). transformers' notes while it looks
    for the files are off (e.g. about a compressed folder's own model type, which its tokenizer
    lookup reads as a plain config): a missing processor is None here, not a problem.
    """
    with quiet_transformers():
        try:
            return transformers.AutoProcessor.from_pretrained(str(path), backend="pil", trust_remote_code=False)
        except (OSError, ValueError, TypeError, KeyError):
            pass
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        except (OSError, ValueError, TypeError, KeyError):
            tokenizer = None
        if tokenizer is None:  # an image-only folder whose model type's processor wants a tokenizer too
            try:
                return transformers.AutoImageProcessor.from_pretrained(str(path), backend="pil",
                                                                       trust_remote_code=False)
            except (OSError, ValueError, TypeError, KeyError):
                return None
    # a folder without tokenizer files can still give an empty tokenizer of only its special tokens
    return tokenizer if len(tokenizer) > len(tokenizer.all_special_tokens) else None
