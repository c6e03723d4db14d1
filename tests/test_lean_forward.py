"""A pruned model's forward is the dense model's forward at smaller widths: upop leaves nothing in it.

For every family (tests/_families.py), after :func:`upop.prune` and after a save /
:func:`upop.load_compressed` round trip: no hooks, parametrizations or per-instance forwards
beyond the dense model's, every parameter and buffer contiguous and of the dense dtype, the
attention implementation (``sdpa`` where the dense model uses it) kept, and the same ATen
operators run (the same attention kernel; no extra reshapes or copies). This is what makes the
batch-1 speed of a compressed model a property of its widths alone (benchmarks/profile_batch1.py).
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import TorchDispatchMode

import upop
from upop.arch import get_spec
from upop.arch._spec import HEAD_COUNT_ATTRS, ROPE_PAIRS

from ._families import FAMILIES

NAMES = sorted(FAMILIES)
# the ops that do the work: a pruned forward must run exactly as many of each as the dense one
HEAVY = ("addmm", "mm", "bmm", "matmul", "baddbmm", "scaled_dot_product", "flash_attention", "softmax", "layer_norm",
         "gelu", "conv", "embedding")
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


class _OpCounter(TorchDispatchMode):
    """Counts the ATen operators a forward dispatches (below autograd, after decomposition)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _ops(model, forward) -> Counter:
    """The ops of one forward, after a first one (a forward may cache what it derives once, e.g. the
    index of a pruned attention's rotary pairs)."""
    with torch.no_grad():
        forward(model)
        with _OpCounter() as counter:
            forward(model)
    return counter.ops


def _rope_selections(model) -> int:
    """index_select ops a pruned model's rotary attentions add: cos and sin, per attention whose
    pairs were pruned (:data:`upop.arch._spec.ROPE_PAIRS`)."""
    return 2 * sum(getattr(m, ROPE_PAIRS, None) is not None for m in model.modules())


def _extras(model) -> list[str]:
    """Everything that runs around a module's own forward: hooks, parametrizations, an instance
    ``forward`` (what a masked Linear has) — as (module name, kind) strings."""
    found = []
    for name, module in model.named_modules():
        for attr in HOOK_DICTS:
            if getattr(module, attr, None):
                found.append(f"{name}:{attr}:{len(getattr(module, attr))}")
        if parametrize.is_parametrized(module):
            found.append(f"{name}:parametrized")
        if "forward" in vars(module):
            found.append(f"{name}:instance forward")
    return found


def _attn_implementations(model) -> dict[str, str | None]:
    config = model.config
    found = {"": getattr(config, "_attn_implementation", None)}
    for key in ("text_config", "vision_config", "decoder_config"):
        sub = getattr(config, key, None)
        if sub is not None:
            found[key] = getattr(sub, "_attn_implementation", None)
    return found


def _prune(model, granularity="head-dim", seed=1):
    """Prune ``model`` in place to random widths (every group loses about 40% of its units)."""
    masks = upop.attach_masks(model, groups=upop.find_groups(model, granularity=granularity))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in masks.items():
            keep = (torch.rand(m.numel(), generator=g) >= 0.4).float()
            keep[torch.randint(m.numel(), (1,), generator=g)] = 1.0
            m.copy_(keep)
    upop.prune(model, masks)
    return model


def _check_lean(model, dense, dense_ops: Counter, forward, swapped: bool) -> None:
    ops = _ops(model, forward)
    # after a forward of each: transformers hooks the layers whose hidden states a forward asks for
    # on its first such forward (LLaVA's vision tower), the dense and the pruned model alike
    assert _extras(model) == _extras(dense)
    assert not torch.nn.modules.module._global_forward_hooks and not torch.nn.modules.module._global_forward_pre_hooks
    dense_dtypes = {name: p.dtype for name, p in dense.named_parameters()}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert tensor.is_contiguous(), f"{name} is not contiguous"
    for name, p in model.named_parameters():
        assert p.dtype == dense_dtypes[name], name
    assert _attn_implementations(model) == _attn_implementations(dense)
    heavy = {op: n for op, n in dense_ops.items() if any(h in op for h in HEAVY)}
    assert heavy and {op: ops[op] for op in heavy} == heavy
    if swapped:  # a class swapped for a shape-generic forward may only run fewer ops, plus the rotary pairs' selection
        selections = _rope_selections(model)
        assert ops["aten.index_select"] - dense_ops["aten.index_select"] == selections
        assert sum(ops.values()) - selections <= sum(dense_ops.values())
        assert set(ops) - set(dense_ops) <= {"aten.unbind"} | ({"aten.index_select"} if selections else set())
    else:
        assert ops == dense_ops


@pytest.mark.parametrize("family", NAMES)
def test_pruned_and_loaded_forward_is_lean(family, tmp_path):
    build, forward, _ = FAMILIES[family]
    dense = build().eval()
    dense_ops = _ops(dense, forward)
    model = _prune(build().eval())
    swapped = get_spec(model).swap_class is not None
    assert any(p.shape != dense.get_parameter(n).shape for n, p in model.named_parameters())
    _check_lean(model, dense, dense_ops, forward, swapped)
    upop.save_compressed(model, tmp_path / "c")
    loaded = upop.load_compressed(tmp_path / "c")
    _check_lean(loaded, dense, dense_ops, forward, swapped)


@pytest.mark.parametrize("family", ["clip", "vit"])
def test_whole_head_pruning_is_lean(family):
    """Whole-head pruning (the batch-1 friendlier granularity) keeps the forward just as lean."""
    build, forward, _ = FAMILIES[family]
    dense = build().eval()
    model = _prune(build().eval(), granularity="head")
    heads = [getattr(m, a) for m in model.modules() for a in HEAD_COUNT_ATTRS if isinstance(getattr(m, a, None), int)]
    assert heads and min(heads) < 4  # whole heads were removed (tiny models: 4 heads)
    _check_lean(model, dense, _ops(dense, forward), forward, swapped=False)


def test_sdpa_kernel_runs_after_pruning():
    """The CPU SDPA kernel (not the eager matmul-softmax path) runs in a pruned CLIP, also with
    head_dim values no kernel-friendly width would have."""
    build, forward, _ = FAMILIES["clip"]
    model = _prune(build().eval())
    assert {m.head_dim for m in model.modules() if hasattr(m, "head_dim")} - {8}
    ops = _ops(model, forward)
    assert any("scaled_dot_product" in op for op in ops) and not any("softmax" in op for op in ops)


def test_masks_removed_leave_no_trace():
    """Attaching masks replaces Linear forwards; removing them restores the plain modules."""
    build, _, _ = FAMILIES["clip"]
    model = build().eval()
    before = _extras(model)
    masks = upop.attach_masks(model)
    assert len(_extras(model)) > len(before)
    masks.remove()
    assert _extras(model) == before
