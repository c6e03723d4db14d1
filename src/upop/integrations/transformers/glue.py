"""What :class:`upop.integrations.transformers.callback.UPopTrainerCallback` does to a ``transformers.Trainer``'s objects
when it prunes or resumes: the optimizer handed the pruned parameters, a DDP wrapper rebuilt over
them, the fp16 loss scale read, weights stored under transformers' original names loaded, and a
pruned checkpoint's weights (``model.upop.safetensors``, which the Trainer does not look for) loaded."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from upop.checkpoint.folder import stored_names, weight_files
from upop.checkpoint.safe_load import UPOP_INDEX, UPOP_WEIGHTS
from upop.errors import CheckpointError


def swap_parameters(optimizer, before: dict[int, str], after: dict[str, nn.Parameter]) -> None:
    """Replace, in every parameter group, each parameter ``prune`` replaced by its pruned
    successor (matched by name), and clear the optimizer state: a fresh optimizer over the pruned
    model, with the same hyper-parameters and groups, and the same object the Trainer, Accelerate
    and the scheduler refer to."""
    if optimizer is None:
        return
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    for group in inner.param_groups:
        group["params"] = [after.get(before.get(id(p), ""), p) for p in group["params"]]
    inner.state.clear()


def rewrap_ddp(trainer) -> None:
    """Under DDP the wrapper the training loop holds was built over the dense parameters: its reducer
    keeps them, and gradient buckets of their size, alive. A new wrapper is built over the pruned
    parameters and the old wrapper object (the loop, the Trainer and Accelerate all refer to it)
    takes its state, the very attribute dictionary: gradients are averaged by the new reducer, and
    the old reducer with its buckets, its logger and its lists of dense parameters is released."""
    ddp = torch.nn.parallel.DistributedDataParallel
    wrapped = getattr(trainer, "model_wrapped", None)
    if not isinstance(wrapped, ddp):
        return
    same = {k: getattr(wrapped, k) for k in ("device_ids", "output_device", "find_unused_parameters",
                                              "gradient_as_bucket_view", "static_graph") if hasattr(wrapped, k)}
    fresh = ddp(wrapped.module, bucket_cap_mb=wrapped.bucket_bytes_cap / 2**20, **same)
    wrapped.__dict__ = fresh.__dict__  # one state for both objects; the old one's is dropped
    wrapped.__dict__["_upop_ddp"] = fresh  # hooks DDP may bind to the new wrapper keep it alive


def load_renamed_weights(model: nn.Module, folder: Path) -> None:
    """Load weights the Trainer stored under transformers' original names (``save_pretrained``'s
    default, e.g. ViT's ``encoder.layer.N.attention.attention.query``) but loaded with
    ``load_state_dict(strict=False)``, which skips them: they are mapped to the model's names."""
    try:
        files = weight_files(folder)
    except CheckpointError:
        return
    keys = []
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            keys.extend(fh.keys())
    names = stored_names(model, dict.fromkeys(keys))
    if names:
        own = model.state_dict()
        state = {}
        for file in files:
            state.update({names.get(k, k): t for k, t in load_file(str(file)).items() if names.get(k, k) in own})
        model.load_state_dict(state, strict=False)


def load_compressed_weights(model: nn.Module, folder: Path):
    """Load the weights of a checkpoint written after pruning (``model.upop.safetensors`` or its
    shards: a compressed folder's, which the Trainer's own loading does not look for) into
    ``model``, already shaped by the checkpoint's plan, under the model's own names. Returns
    ``load_state_dict``'s result (for the Trainer's report of missing keys), or None when
    ``folder`` holds no such weights (the Trainer loads it as usual)."""
    if not any((folder / name).is_file() for name in (UPOP_WEIGHTS, UPOP_INDEX)):
        return None
    files = weight_files(folder)  # refuses a folder that also holds model.safetensors
    keys = []
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            keys.extend(fh.keys())
    names = stored_names(model, dict.fromkeys(keys))
    state = {}
    for file in files:
        state.update({names.get(k, k): t for k, t in load_file(str(file)).items()})
    return model.load_state_dict(state, strict=False)
