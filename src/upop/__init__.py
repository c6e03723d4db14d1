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

from .api import CompressResult, compress, evaluate
from .latency import time_models
from .arch import ArchSpec, find_groups, get_spec, register_spec, supported_model_types
from .checkpoint import load_compressed, read_plan, save_compressed
from .config import UPopConfig
from .cost import count_flops, count_params, measure_latency, prunable_cost
from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    TaskError,
    UnsupportedModelError,
    UPopError,
)
from .groups import Group
from .integrations import UPopTrainerCallback
from .masks import Masks, attach_masks
from .models import load_any as load_model
from .prune import PruningPlan, apply_plan, prune
from .search import UPopSearch, ratio_at

__version__ = "0.1.0"

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
    "UnsupportedModelError",
    "apply_plan",
    "attach_masks",
    "count_flops",
    "count_params",
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
