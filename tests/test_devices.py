"""What a GPU machine would do, shown on the CPU: device state that must not depend on how many
devices are visible, and exports that never change the caller's model (issue "Ready for the GPU
it has never met"). The CUDA calls are simulated where the fault lives in upop's bookkeeping."""

from __future__ import annotations

import pytest
import torch

from upop.engine import runtime


class _FakeCuda:
    """``torch.cuda`` as seen by a process on GPU ``index`` of ``visible`` GPUs (RNG calls only)."""

    def __init__(self, visible: int, index: int = 0):
        self.visible, self.index, self.set = visible, index, []

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.visible)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.index)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.full((4,), self.index,
                                                                                          dtype=torch.uint8))
        monkeypatch.setattr(torch.cuda, "get_rng_state_all",
                            lambda: [torch.full((4,), i, dtype=torch.uint8) for i in range(self.visible)])

        def set_state(state, device="cuda"):
            if self.index >= self.visible:
                raise IndexError("device index out of range")
            self.set.append(int(state[0]))

        monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)

        def set_all(states):
            for i, state in enumerate(states):
                if i >= self.visible:
                    raise IndexError("list index out of range")  # what torch does with fewer GPUs
                self.set.append(int(state[0]))

        monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)


def test_a_state_saved_on_eight_gpus_restores_with_one_visible(monkeypatch):
    """Saved by process 3 of an 8-GPU node, resumed with CUDA_VISIBLE_DEVICES=0: the state is this
    process's GPU only, restored on the one GPU it now has (it used to be all eight, IndexError)."""
    _FakeCuda(8, index=3).install(monkeypatch)
    saved = runtime.rng_state()
    assert len(saved["cuda"]) == 1 and int(saved["cuda"][0][0]) == 3
    later = _FakeCuda(1, index=0)
    later.install(monkeypatch)
    runtime.set_rng_state(saved)
    assert later.set == [3]


@pytest.mark.parametrize("index, expected", [(0, 0), (2, 2)])
def test_an_older_state_of_every_gpu_restores_this_process_s_one(monkeypatch, index, expected):
    """A state written by an earlier upop (every visible GPU's) restores the one of this process's
    device where it has one, with as many or fewer GPUs visible."""
    _FakeCuda(8).install(monkeypatch)
    saved = {**runtime.rng_state(), "cuda": torch.cuda.get_rng_state_all()}
    later = _FakeCuda(index + 1, index=index)
    later.install(monkeypatch)
    runtime.set_rng_state(saved)
    assert later.set == [expected]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mask_gradient_sums_are_formed_in_float32_in_half_precision(dtype):
    """A unit's mask gradient is a sum over its weight row; under fp16 and a loss scale it
    overflows where no element of the weight gradient does (the step's mask gradient was then
    dropped as non-finite), and in bf16 it loses all but 8 bits. Formed in float32 it is finite and
    equals the float64 sum of the same half-precision products."""
    from upop.pruning.masks import _MaskedLinear

    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 128, generator=g).to(dtype)
    weight = torch.rand(8, 128, generator=g).to(dtype)
    scale = torch.ones(8, dtype=torch.float32, requires_grad=True)
    out = _MaskedLinear.apply(x, weight, None, scale)
    grad_out = torch.full_like(out, 64.0)  # a loss-scaled gradient: every token pushes the same way
    out.backward(grad_out)
    big_g = (grad_out.reshape(-1, 8).to(dtype).t() @ x.reshape(-1, 128)).to(torch.float64)
    expected = (big_g * weight.to(torch.float64)).sum(1)
    assert torch.isfinite(scale.grad).all()
    if dtype == torch.float16:
        assert float(expected.max()) > torch.finfo(torch.float16).max  # the fp16 sum would overflow
    assert torch.allclose(scale.grad.to(torch.float64), expected, rtol=1e-3)


def test_tf32_is_set_and_read_through_the_api_a_trainer_used():
    """After a transformers Trainer set TF32 through torch's new API (fp32_precision), reading or
    setting the legacy allow_tf32 raises "mix of the legacy and new APIs": upop's run set-up and
    latency timing use the API in force (a fresh interpreter: the flags are process-wide)."""
    import subprocess
    import sys

    code = """
import torch
from upop.engine import runtime
from upop.measure import latency
torch.backends.cuda.matmul.fp32_precision = "ieee"   # as a Trainer with tf32=False leaves it
with latency.tf32_as(torch.device("cuda"), True):
    assert runtime.tf32_enabled()
assert not runtime.tf32_enabled() and torch.backends.cuda.matmul.fp32_precision == "ieee"
before = runtime.set_tf32(True)
assert runtime.tf32_enabled() and torch.backends.cudnn.conv.fp32_precision == "tf32"
runtime.restore_tf32(before)
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_validation_during_bf16_training_runs_at_the_evaluation_precision():
    """Accelerate's bf16 training forward (autocast, outputs cast to fp32) stays on the module its
    unwrap_model returns; retraining's validation used it, so the best checkpoint was chosen in
    bf16 while the dense and final evaluations ran in fp32. Inside ``evaluating`` the model's own
    forward runs (fp32 here, or bf16 autocast with --eval-precision bf16); after it, training's.
    (A fresh interpreter: Accelerate's state is one per process.)"""
    import subprocess
    import sys

    code = """
import torch
from accelerate import Accelerator
from upop.engine.runtime import evaluating

torch.manual_seed(0)
model = torch.nn.Linear(64, 64)
x = torch.randn(8, 64)
exact = model(x)
acc = Accelerator(mixed_precision="bf16", cpu=True)
unwrapped = acc.unwrap_model(acc.prepare(model))
trained = unwrapped(x)  # the training forward: bf16 matmul, fp32 output
assert not torch.equal(trained, exact)
with evaluating(unwrapped, acc.device, "fp32") as m:
    assert torch.equal(m(x), exact)
with evaluating(unwrapped, acc.device, "bf16") as m:
    assert torch.allclose(m(x).float(), trained, atol=1e-2)
assert torch.equal(unwrapped(x), trained)  # training's forward is back
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]
