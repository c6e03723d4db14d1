"""UPop inside a transformers.Trainer: only the callback is added, one train() searches, prunes and
retrains; checkpoints resume to the same plan and weights; fp16 loss scales and gradient
accumulation are taken into account (tiny ViT, CPU, a few dozen steps)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import upop
import upop.models.folders as M
from upop.checkpoint.folder import WEIGHTS_FILE
from upop.checkpoint.safe_load import SAFE_WEIGHTS
from upop.integrations.transformers.callback import SEARCH_FILE, UPopTrainerCallback, add_upop

transformers.logging.set_verbosity_error()
LR = 1e-3


class _Images(torch.utils.data.Dataset):
    """32 random 32x32 images with labels, the same every time."""

    def __init__(self, n: int = 32):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def _trainer(out, max_steps=12, batch=8, **kwargs):
    args = transformers.TrainingArguments(
        output_dir=str(out), report_to=[], use_cpu=True, max_steps=max_steps, per_device_train_batch_size=batch,
        learning_rate=LR, seed=0, disable_tqdm=True, logging_steps=1, **{"save_strategy": "no", **kwargs})
    return transformers.Trainer(model=M.make_model("vit"), args=args, train_dataset=_Images())


def _logits(model):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model.eval()(pixel_values=x).logits


def _kept(plan):
    return {name: g.kept for name, g in plan.groups.items()}


class _Probe(transformers.TrainerCallback):
    """Records the parameters right after the switch to retraining (it runs after the UPop callback)."""

    def __init__(self, at: int):
        self.at, self.params = at, None

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == self.at:
            self.params = {n: p.detach().clone() for n, p in model.named_parameters()}
            self.optimizer_ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
            self.model_ids = {id(p) for p in model.parameters()}


class _Stop(transformers.TrainerCallback):
    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            control.should_training_stop = True


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: 12 steps, the default search length (half: 6), checkpoints every 4."""
    out = tmp_path_factory.mktemp("reference")
    trainer = _trainer(out, save_strategy="steps", save_steps=4, warmup_steps=2)
    dense = trainer.model
    callback = add_upop(trainer, ratio=0.5, round_to=1, interval=2)
    probe = _Probe(at=6)
    trainer.add_callback(probe)
    trainer.train()
    assert trainer.model is dense  # pruned in place
    return trainer, callback, probe, out


def test_one_train_searches_prunes_and_retrains(reference, tmp_path):
    trainer, callback, probe, out = reference
    plan = callback.plan
    assert callback.search_steps == 6 and callback.search.done and callback.search.history[-1].step == 5
    groups = upop.find_groups(M.make_model("vit"))
    one_unit = max(g.param_cost for g in groups) / upop.prunable_cost(groups)
    assert 0.5 <= plan.achieved_ratio["params"] < 0.5 + one_unit
    assert trainer.model.upop_plan is plan
    assert upop.count_params(trainer.model) < upop.count_params(M.make_model("vit"))
    # the optimizer holds exactly the pruned parameters, and retraining moved them
    assert probe.optimizer_ids == probe.model_ids
    final = dict(trainer.model.named_parameters())
    assert any(not torch.equal(final[n], p) for n, p in probe.params.items())
    # constant learning rate while searching, then the Trainer's schedule (warmup 2, linear) restarts
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert lrs[:6] == [LR] * 6
    assert lrs[6:] == pytest.approx([0.0, LR / 2, LR, 3 * LR / 4, LR / 2, LR / 4])
    # checkpoints: the search state during the search, the plan (and pruned weights) after it
    assert (out / "checkpoint-4" / SEARCH_FILE).is_file() and not (out / "checkpoint-4" / "upop_plan.json").exists()
    assert upop.read_plan(out / "checkpoint-8").groups == plan.groups
    # the compressed model saves and reloads: by save_compressed, and by the Trainer itself
    want = _logits(trainer.model)
    upop.save_compressed(trainer.model, tmp_path / "compressed", plan=plan)
    trainer.save_model(str(tmp_path / "saved"))
    for folder in ("compressed", "saved"):
        again = upop.load_compressed(tmp_path / folder)
        assert _kept(again.upop_plan) == _kept(plan)
        assert torch.allclose(_logits(again), want, atol=1e-6, rtol=0)


def test_resume_during_search_and_retraining_matches_uninterrupted(reference, tmp_path):
    trainer, callback, _, out = reference
    want = _logits(trainer.model)
    # a run stopped at step 5 (mid-search; last checkpoint at 4), resumed by a fresh Trainer
    first = _trainer(tmp_path / "b", save_strategy="steps", save_steps=4, warmup_steps=2)
    stopped = add_upop(first, ratio=0.5, round_to=1, interval=2)
    first.add_callback(_Stop(at=5))
    first.train()
    assert stopped.plan is None and not stopped.search.done
    for resume_from, folder in ((True, tmp_path / "b"), (str(out / "checkpoint-8"), tmp_path / "c")):
        again = _trainer(folder, save_strategy="steps", save_steps=4, warmup_steps=2)
        resumed = add_upop(again, ratio=0.5, round_to=1, interval=2)
        again.train(resume_from_checkpoint=resume_from)
        assert _kept(resumed.plan) == _kept(callback.plan)
        assert torch.allclose(_logits(again.model), want, atol=1e-6, rtol=0), resume_from


def test_best_model_loading_reads_a_pruned_checkpoint(reference):
    """A checkpoint after pruning holds model.upop.safetensors (a dense class cannot load it), which
    the Trainer's own best-model loading does not look for: add_upop's wrapper loads it."""
    trainer, _, _, out = reference
    folder = out / "checkpoint-8"
    assert (folder / WEIGHTS_FILE).is_file() and not (folder / SAFE_WEIGHTS).exists()
    want = upop.load_compressed(folder).state_dict()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert any(not torch.equal(before[k], want[k]) for k in want)  # step 12's weights, not step 8's
    best = trainer.state.best_model_checkpoint
    try:
        trainer.state.best_model_checkpoint = str(folder)
        trainer._load_best_model()
        got = trainer.model.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)
    finally:
        trainer.state.best_model_checkpoint = best
        trainer.model.load_state_dict(before)


class _FakeScaler:
    """What fp16 training does to gradients, on the CPU: the loss is multiplied by a power of two
    (so every gradient is exactly that multiple) and the optimizer's gradients divided again."""

    def __init__(self, scale: float):
        self.scale_value, self.calls = scale, 0

    def scale(self, loss):
        self.calls += 1
        return loss * self.scale_value

    def get_scale(self):
        return self.scale_value

    def step(self, optimizer, closure=None):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.div_(self.scale_value)
        return optimizer.step()

    def update(self):
        pass

    def state_dict(self):
        return {"scale": self.scale_value}

    def load_state_dict(self, state):
        self.scale_value = state["scale"]


def _search_only(out, scaler=None, batch=8, **kwargs):
    """Four steps, all of them search (search_epochs=1 of 32 images in batches of 8)."""
    trainer = _trainer(out, max_steps=4, batch=batch, max_grad_norm=0.0, **kwargs)
    if scaler is not None:
        trainer.accelerator.scaler = scaler
    callback = add_upop(trainer, ratio=0.5, round_to=1, interval=1, search_epochs=1)
    trainer.train()
    assert callback.search_steps == 4 and callback.search.step_count == 4
    return callback


def test_mask_gradients_are_unscaled(tmp_path):
    plain = _search_only(tmp_path / "plain")
    scaler = _FakeScaler(2.0**10)
    scaled = _search_only(tmp_path / "scaled", scaler=scaler)
    assert scaler.calls == 4
    # power-of-two scaling is exact: the accumulated mask gradients are bit for bit the same
    for name, total in plain.search.masks.grad_sum.items():
        assert torch.equal(scaled.search.masks.grad_sum[name], total), name
    assert _kept(scaled.plan) == _kept(plain.plan)


def test_gradient_accumulation_takes_one_step_per_optimizer_step(tmp_path):
    whole = _search_only(tmp_path / "whole")
    halves = _search_only(tmp_path / "halves", batch=4, gradient_accumulation_steps=2)
    assert [u.step for u in halves.search.history] == [0, 1, 2, 3]
    for name, total in whole.search.masks.grad_sum.items():
        assert torch.allclose(halves.search.masks.grad_sum[name], total, rtol=1e-4, atol=1e-6), name


def test_refusals(tmp_path):
    with pytest.raises(upop.ConfigError, match="at most one of search_steps"):
        UPopTrainerCallback(search_steps=4, search_epochs=1)
    with pytest.raises(upop.ConfigError, match="ratio must be"):
        UPopTrainerCallback(ratio=1.5)
    with pytest.raises(upop.ConfigError, match="search_fraction"):
        UPopTrainerCallback(search_fraction=0)
    unbound = _trainer(tmp_path / "a", max_steps=2)
    unbound.add_callback(UPopTrainerCallback())
    with pytest.raises(upop.ConfigError, match="add_upop"):
        unbound.train()
    too_long = _trainer(tmp_path / "b", max_steps=2)
    add_upop(too_long, search_steps=3)
    with pytest.raises(upop.ConfigError, match="more than the run's max_steps=2"):
        too_long.train()
    # a plain Trainer checkpoint holds no search state to resume
    _trainer(tmp_path / "c", max_steps=2, save_strategy="steps", save_steps=2).train()
    resumed = _trainer(tmp_path / "d", max_steps=8)
    add_upop(resumed, round_to=1)
    with pytest.raises(upop.CheckpointError, match=SEARCH_FILE):
        resumed.train(resume_from_checkpoint=str(tmp_path / "c" / "checkpoint-2"))


_DDP_SCRIPT = """
import os, sys, torch, transformers
sys.path.insert(0, {tests!r})
from test_trainer_callback import _trainer
import gc, weakref
import upop.integrations.transformers.callback as cb
from upop.integrations.transformers.callback import add_upop
rewrap, dense = cb.rewrap_ddp, {{}}


def spy(trainer):  # what the dense wrapper held: is it released by the rebuild?
    wrapped = trainer.model_wrapped
    kept = {{id(p) for p in trainer.model.parameters()}}  # already the pruned parameters
    dense["reducer"] = weakref.ref(wrapped.reducer)
    dense["params"] = [weakref.ref(p) for p in wrapped._module_parameters if id(p) not in kept]
    dense["wrapper"] = wrapped
    rewrap(trainer)
    gc.collect()


cb.rewrap_ddp = spy
trainer = _trainer(sys.argv[1], max_steps=8, batch=4, gradient_accumulation_steps=2, ddp_backend="gloo")
callback = add_upop(trainer, ratio=0.5, round_to=1, interval=1, distill=sys.argv[2])
distiller = callback.distiller
trainer.train()
assert (distiller is None) == (sys.argv[2] == "none")
assert distiller is None or (set(distiller.last) == {{"logits", "hidden"}} and distiller.last["hidden"] > 0)
assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel"
assert trainer.model_wrapped is dense["wrapper"]  # the loop's wrapper, now over the pruned parameters
assert dense["params"], "pruning replaced no parameter"
released = {{"reducer": dense["reducer"]() is None, "params": all(r() is None for r in dense["params"])}}
torch.save({{"weights": trainer.model.state_dict(), "sums": callback.search.masks.grad_sum,
            "kept": {{k: g.kept for k, g in callback.plan.groups.items()}}, "released": released}},
           os.path.join(sys.argv[1], "rank%s.pt" % os.environ["RANK"]))
"""


@pytest.mark.parametrize("distill", [pytest.param("none", marks=pytest.mark.slow), "logits+hidden"])
def test_two_processes_keep_identical_masks_and_weights(distill, tmp_path):
    """DDP (two gloo processes, different data): the same plan, and the same weights after
    retraining, which needs the DDP wrapper rebuilt over the pruned parameters; also with
    distillation (each process holds its teacher, the term added inside the DDP forward)."""
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT.format(tests=str(Path(__file__).parent)))
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", "29587", str(script), str(tmp_path),
                           distill], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a["kept"] == b["kept"]
    assert all(torch.equal(a["sums"][k], b["sums"][k]) for k in a["sums"])
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    # the dense wrapper's reducer (its dense-size gradient buckets) and the dense parameters it held
    # are gone after the rebuild, on both processes
    assert a["released"] == b["released"] == {"reducer": True, "params": True}
