"""Class names between a data set and a model: the model's ``id2label`` decides the label ids.

A data set names its classes (ImageFolder class folders, an ADE20K ``classes.json`` or
``objectInfo150`` file); a fine-tuned model names its outputs in ``config.id2label``. Labels
must mean the same class on both sides, or the model trains on permuted labels without any
error. :func:`align_classes` returns, for each data class, the model's id for it:

* a model with transformers' default names (``LABEL_0``, ``LABEL_1``, ...) is new to these
  classes: they take ids ``0..n-1`` in the data's order, and ``config.id2label`` /
  ``config.label2id`` are set to the data's names (so a saved checkpoint and a pipeline show
  them);
* a model with real names: each data class gets the id of the model class of the same name,
  compared exactly, else ignoring case, ``_``, ``-`` and spacing;
* names that share nothing with the data's are another naming of the classes (ImageNet's
  WordNet-id folders ``n01440764`` against a Hub model's ``"tench, Tinca tinca"``): the data's
  order is kept, which for ImageNet is the standard class order;
* names that partly match are refused: some classes would be trained as the wrong ones.

The number of classes is checked by the task before (``num_labels``).
"""

from __future__ import annotations

from typing import Callable, Sequence

from upop.errors import DataError, show


def model_class_names(config) -> list[str] | None:
    """The model's class names by id, or None when they are transformers' defaults (``LABEL_i``)."""
    count = int(config.num_labels)
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    names = [id2label.get(i) for i in range(count)]
    if any(name is None for name in names) or names == [f"LABEL_{i}" for i in range(count)]:
        return None
    return names  # type: ignore[return-value]


def _loose(name: str) -> str:
    return " ".join(name.replace("_", " ").replace("-", " ").split()).casefold()


def _match(names: Sequence[str], classes: Sequence[str], key: Callable[[str], str]) -> list[int] | None:
    """Model id of each data class under ``key``, if every class matches a different model class."""
    ids: dict[str, int] = {}
    for i, name in enumerate(names):
        ids.setdefault(key(name), i)
    found = [ids.get(key(c)) for c in classes]
    if any(i is None for i in found) or len(set(found)) != len(found):
        return None
    return found  # type: ignore[return-value]


def name_classes(config, classes: Sequence[str]) -> None:
    """Set ``config.id2label`` / ``config.label2id`` to the data's class names in order."""
    config.id2label = {i: str(name) for i, name in enumerate(classes)}
    config.label2id = {str(name): i for i, name in enumerate(classes)}


def align_classes(config, classes: Sequence[str], where: str) -> list[int]:
    """The model's label id of each data class (see the module docstring); ``where`` names the data."""
    names = model_class_names(config)
    if names is None:
        name_classes(config, classes)
        return list(range(len(classes)))
    for key in (str, _loose):
        found = _match(names, classes, key)
        if found is not None:
            return found
    model_keys = {_loose(n) for n in names}
    data_keys = {_loose(c) for c in classes}
    if not model_keys & data_keys:
        return list(range(len(classes)))
    extra = [c for c in classes if _loose(c) not in model_keys]
    missing = [n for n in names if _loose(n) not in data_keys]
    if not extra and not missing:
        raise DataError(f"{where}: several class names match the same class of the model's config.id2label once "
                        f"case, '_' and '-' are ignored ({show(list(classes)[:5])}); give every class a distinct name")
    raise DataError(f"{where}: the class names disagree with the model's config.id2label: "
                    f"{len(extra)} not in the model ({show(extra[:3])}{' ...' if len(extra) > 3 else ''}), "
                    f"{len(missing)} of the model's missing ({show(missing[:3])}{' ...' if len(missing) > 3 else ''}); "
                    "use the model's class names (or a model with default LABEL_i names, which takes the data's)")


__all__ = ["align_classes", "model_class_names", "name_classes"]
