"""Nothing lost: resume at every phase, mixed-precision accumulation, non-finite values."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import upop
from upop.checkpoint.folder import WEIGHTS_FILE
from upop.api import compress
from upop.models.folders import load_any
from upop.tasks.retrieval import RetrievalTask
from upop.engine.run import STATE_FILE, TrainingError

from ._families import FAMILIES, clip_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = clip_world(tmp_path_factory.mktemp("robust"), 48, 8, 8)
    return root


CFG = dict(ratio=0.5, search_epochs=2, retrain_epochs=2, batch_size=8, lr=1e-3, checkpoint_every=2, interval=2,
           latency_time=0.02)


def _compress(world, out, task="retrieval", workers=None, **kw):
    model, processor = load_any(world / "model")
    return compress(model, task, world / "data", processor=processor, config=upop.UPopConfig(**CFG, workers=workers),
                    out_dir=out, progress=False, log=lambda msg: None, **kw)


def _same_result(a_dir, b_dir) -> bool:
    a = load_file(str(a_dir / "compressed" / WEIGHTS_FILE))
    b = load_file(str(b_dir / "compressed" / WEIGHTS_FILE))
    return (upop.read_plan(a_dir / "compressed").groups == upop.read_plan(b_dir / "compressed").groups
            and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a))


# search: 2 epochs x 6 steps = 12 steps; step 13 is pruning; retrain: 12 steps
STOPS = {"during search": 5, "at the last search step": 12, "between prune and retrain": 13, "during retrain": 17,
         "at the end of a retrain epoch": 19}


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    _compress(world, out)
    return out


#: the boundary between the phases in the default suite; the other stops in CI's second stage (slow)
FAST_STOP = "between prune and retrain"


@pytest.mark.parametrize("where", [pytest.param(w, marks=() if w == FAST_STOP else pytest.mark.slow)
                                   for w in sorted(STOPS)])
def test_stop_anywhere_then_resume_gives_identical_result(where, world, reference, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _compress(world, out, stop_after=STOPS[where])
    assert (out / "state" / STATE_FILE).is_file() and not (out / "report.json").exists()
    _compress(world, out, resume=True)
    ref_plan = upop.read_plan(reference / "compressed")
    assert upop.read_plan(out / "compressed").groups == ref_plan.groups
    a = load_file(str(reference / "compressed" / WEIGHTS_FILE))
    b = load_file(str(out / "compressed" / WEIGHTS_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_dataloader_workers_give_the_same_run(world, reference, tmp_path):
    """Batches built by 2 DataLoader workers are the in-process ones: same plan, same weights,
    also when a run with workers is stopped and resumed without them."""
    _compress(world, tmp_path / "workers", workers=2)
    assert _same_result(reference, tmp_path / "workers")
    with pytest.raises(KeyboardInterrupt):
        _compress(world, tmp_path / "mixed", workers=2, stop_after=STOPS["during retrain"])
    _compress(world, tmp_path / "mixed", workers=0, resume=True)
    assert _same_result(reference, tmp_path / "mixed")


def test_resume_of_a_finished_run_only_rewrites_the_report(world, reference, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    result = _compress(world, out, resume=True)
    assert upop.read_plan(out / "compressed").groups == upop.read_plan(reference / "compressed").groups
    assert result.report["achieved_ratio"] == json.loads((reference / "report.json").read_text())["achieved_ratio"]


class _NaNAt(RetrievalTask):
    """Retrieval whose loss turns NaN at a given call (a diverging run)."""

    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def loss(self, model, batch):
        loss = super().loss(model, batch)
        self.calls += 1
        return loss * float("nan") if self.calls > self.at else loss


def test_non_finite_loss_stops_at_the_last_good_checkpoint(world, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="search step 5") as info:
        _compress(world, out, task=_NaNAt(5))
    assert "\n" not in str(info.value)
    state = torch.load(out / "state" / STATE_FILE, weights_only=True)
    assert state["phase"] == "search" and state["step"] == 4
    values = torch.cat(list(state["search"]["masks"]["values"].values()))
    assert torch.isfinite(values).all()
    sums = torch.cat(list(state["search"]["masks"]["grad_sum"].values()))
    assert torch.isfinite(sums).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mask_gradients_accumulate_under_autocast(dtype):
    """Under autocast the sums are still the exact float64 sum of each step's gradients."""
    torch.manual_seed(0)
    model = FAMILIES["clip"][0]().train()
    masks = upop.attach_masks(model)
    search = upop.UPopSearch(masks, ratio=0.5, total_steps=100, interval=50)
    expected = {n: torch.zeros(m.numel(), dtype=torch.float64) for n, m in masks.items()}
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        batch = {"input_ids": torch.randint(9, 100, (4, 8), generator=g), "pixel_values": torch.randn(4, 3, 32, 32, generator=g)}
        with torch.autocast("cpu", dtype=dtype):
            out = model(**batch)
            loss = out.logits_per_image.float().logsumexp(-1).mean()
        scale = 256.0  # as an fp16 loss scaler would
        (loss * scale).backward()
        for name, m in masks.items():
            expected[name] += m.grad.double() / scale
        search.step(step, grad_scale=scale)
        model.zero_grad()
    for name in expected:
        assert torch.allclose(masks.grad_sum[name], expected[name], rtol=1e-12, atol=0)
        assert masks.grad_sum[name].abs().sum() > 0


def test_overflowing_fp16_steps_are_skipped_not_fatal():
    model = FAMILIES["clip"][0]().train()
    masks = upop.attach_masks(model)
    search = upop.UPopSearch(masks, ratio=0.5, total_steps=10, interval=5)
    name = masks.groups[0].name
    masks[name].grad = torch.full_like(masks[name], math.inf)
    assert search.step(0, grad_scale=65536.0, skip_nonfinite=True) is None
    assert search.skipped_steps == 1 and torch.isfinite(masks.grad_sum[name]).all()
