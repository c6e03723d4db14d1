"""The masked Linear: exact gradients (gradcheck), the same values as multiplying the output, and
no more saved activations than a plain Linear."""

from __future__ import annotations

import pytest
import torch

from upop.pruning.masks import _MaskedLinear


@pytest.mark.parametrize("rows", [15, 2])  # more rows than input features, fewer (both backward branches)
@pytest.mark.parametrize("bias", [True, False])
def test_masked_linear_gradients_are_exact(bias, rows):
    torch.manual_seed(0)
    x = torch.randn(1, rows, 4, dtype=torch.double, requires_grad=True)
    w = torch.randn(6, 4, dtype=torch.double, requires_grad=True)
    b = torch.randn(6, dtype=torch.double, requires_grad=True) if bias else None
    s = torch.tensor([1.0, 0.5, 0.0, 1.0, 0.3, 1.0], dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(_MaskedLinear.apply, (x, w, b, s))


def test_masked_linear_matches_output_times_mask():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 8, requires_grad=True)
    lin = torch.nn.Linear(8, 5)
    s = torch.rand(5, requires_grad=True)
    ref = lin(x) * s
    got = _MaskedLinear.apply(x, lin.weight, lin.bias, s)
    assert torch.allclose(ref, got)
    g = torch.randn_like(ref)
    grads_ref = torch.autograd.grad(ref, (x, lin.weight, lin.bias, s), g)
    grads_got = torch.autograd.grad(got, (x, lin.weight, lin.bias, s), g)
    for a, b in zip(grads_ref, grads_got):
        assert torch.allclose(a, b, atol=1e-5)


def test_masked_linear_saves_only_what_a_linear_saves():
    """The unmasked output is not kept for backward (the naive ``linear(x) * s`` keeps it)."""
    x = torch.randn(4, 16, 32, requires_grad=True)
    lin = torch.nn.Linear(32, 64)
    s = torch.ones(64, requires_grad=True)

    def saved_bytes(fn):
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(sizes)

    naive = saved_bytes(lambda: lin(x) * s)
    ours = saved_bytes(lambda: _MaskedLinear.apply(x, lin.weight, lin.bias, s))
    plain = saved_bytes(lambda: lin(x))
    assert ours <= plain + 64 * 4 + 64 * 4  # x and the weight, as a Linear; plus bias and mask vectors
    assert naive - ours >= 4 * 16 * 64 * 4 - 2 * 64 * 4  # the naive version also keeps the (4, 16, 64) output
