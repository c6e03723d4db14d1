"""upop: Unified and Progressive Pruning (UPop, Shi et al., ICML 2023) for Hugging Face
vision-language and vision transformers.

    import upop
    model, processor = upop.load_model("path/to/clip")          # or any transformers model
    result = upop.compress(model, "retrieval", "data/coco", processor=processor,
                           config=upop.UPopConfig(ratio=0.5), out_dir="out")

or, stage by stage:

    masks = upop.attach_masks(model)                 # one mask per attention / MLP group
    search = upop.UPopSearch(masks, ratio=0.5, total_steps=T, interval=50)
    ...                                              # train; search.step(t) after backward
    plan = upop.prune(model, masks)                  # slice the pruned units, in place
    upop.save_compressed(model, "out/compressed")
    model = upop.load_compressed("out/compressed")   # same class as the dense model
"""

from importlib import import_module
from importlib.util import find_spec
from typing import TYPE_CHECKING

#: public name -> the module that defines it. The package face imports nothing until a name is
#: used (PEP 562), so ``import upop`` is instant and pulls in neither torch's nor transformers'
#: heavy parts (the Trainer machinery only with ``upop.UPopTrainerCallback``).
_EXPORTS = {
    "CompressResult": "api", "compress": "api", "evaluate": "api",
    "time_models": "measure.latency",
    "ArchSpec": "arch", "find_groups": "arch", "get_spec": "arch", "register_spec": "arch",
    "supported_model_types": "arch",
    "load_compressed": "checkpoint.folder", "read_plan": "checkpoint.folder", "save_compressed": "checkpoint.folder",
    "UPopConfig": "config",
    "count_flops": "measure.cost", "count_params": "measure.cost", "measure_latency": "measure.cost",
    "prunable_cost": "measure.cost",
    "export_onnx": "export.onnx",
    "CheckpointError": "errors", "ConfigError": "errors", "DataError": "errors", "TaskError": "errors",
    "UnsupportedModelError": "errors", "UPopError": "errors",
    "Group": "arch.groups",
    "UPopTrainerCallback": "integrations.transformers.callback", "add_upop": "integrations.transformers.callback",
    "Masks": "pruning.masks", "attach_masks": "pruning.masks",
    "load_model": ("models.folders", "load_any"),
    "PruningPlan": "pruning.prune", "apply_plan": "pruning.prune", "prune": "pruning.prune",
    "UPopSearch": "search.mask_search", "ratio_at": "search.mask_search",
}


def __getattr__(name: str):
    target = _EXPORTS.get(name)
    if target is None:
        if not name.startswith("__") and find_spec(f"{__name__}.{name}") is not None:
            return import_module(f".{name}", __name__)  # a subpackage: ``upop.models``, ``upop.tasks``, ...
        raise AttributeError(f"module 'upop' has no attribute {name!r}")
    module, attr = (target, name) if isinstance(target, str) else target
    value = getattr(import_module(f".{module}", __name__), attr)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs: the names as eager imports
    from upop.api import CompressResult, compress, evaluate  # noqa: F401
    from upop.arch import ArchSpec, find_groups, get_spec, register_spec, supported_model_types  # noqa: F401
    from upop.checkpoint.folder import load_compressed, read_plan, save_compressed  # noqa: F401
    from upop.config import UPopConfig  # noqa: F401
    from upop.measure.cost import count_flops, count_params, measure_latency, prunable_cost  # noqa: F401
    from upop.export.onnx import export_onnx  # noqa: F401
    from upop.errors import (CheckpointError, ConfigError, DataError, TaskError, UnsupportedModelError,  # noqa: F401
                         UPopError)
    from upop.arch.groups import Group  # noqa: F401
    from upop.integrations.transformers.callback import UPopTrainerCallback, add_upop  # noqa: F401
    from upop.measure.latency import time_models  # noqa: F401
    from upop.pruning.masks import Masks, attach_masks  # noqa: F401
    from upop.models.folders import load_any as load_model  # noqa: F401
    from upop.pruning.prune import PruningPlan, apply_plan, prune  # noqa: F401
    from upop.search.mask_search import UPopSearch, ratio_at  # noqa: F401

from upop._version import __version__  # noqa: E402

__all__ = [
    "ArchSpec",
    "CompressResult",
    "UPopConfig",
    "compress",
    "evaluate",
    "load_model",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "Group",
    "Masks",
    "PruningPlan",
    "TaskError",
    "UPopError",
    "UPopSearch",
    "UPopTrainerCallback",
    "add_upop",
    "UnsupportedModelError",
    "apply_plan",
    "attach_masks",
    "count_flops",
    "count_params",
    "export_onnx",
    "find_groups",
    "get_spec",
    "load_compressed",
    "measure_latency",
    "prunable_cost",
    "prune",
    "ratio_at",
    "read_plan",
    "register_spec",
    "save_compressed",
    "supported_model_types",
    "time_models",
]
