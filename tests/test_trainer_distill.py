"""Distillation inside a transformers.Trainer (``add_upop(..., distill=...)``): the term read off the
model output is zero for student = teacher and the documented KL otherwise, evaluation forwards are
untouched, the teacher stays frozen and unchanged through search, pruning and retraining, a
resumed run equals an uninterrupted one, the hooks come off after training, and bad settings are
one-line errors (tiny ViT / CLIP, CPU, a dozen steps)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import upop.models.folders as M
from upop.distill.distiller import kl_logits
from upop.errors import ConfigError
from upop.integrations.transformers.callback import UPopTrainerCallback, add_upop
from upop.integrations.transformers.distill import TrainerDistiller

from .test_trainer_callback import _trainer  # the tiny ViT Trainer (32 random images, CPU)

transformers.logging.set_verbosity_error()


def _perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _vit_batch():
    g = torch.Generator().manual_seed(3)
    return {"pixel_values": torch.randn(4, 3, 32, 32, generator=g), "labels": torch.randint(0, 10, (4,), generator=g)}


def _clip_batch(model):
    g = torch.Generator().manual_seed(3)
    size = model.config.vision_config.image_size
    return {"pixel_values": torch.randn(4, 3, size, size, generator=g),
            "input_ids": torch.randint(3, model.config.text_config.vocab_size, (4, 7), generator=g),
            "return_loss": True}


@pytest.mark.parametrize("family, mode, weight", [("vit", "logits", 1.0), ("vit", "logits+hidden", 0.5),
                                                  ("clip", "logits", 2.0), ("clip", "logits+hidden", 1.0)])
def test_term_is_zero_for_the_teacher_and_the_kl_otherwise(family, mode, weight):
    model = M.make_model(family).train()
    batch = _vit_batch() if family == "vit" else _clip_batch(model)
    plain = copy.deepcopy(model)
    distiller = TrainerDistiller(model, mode, weight=weight, temperature=2.0)
    out = model(**batch)
    torch.testing.assert_close(out.loss, plain(**batch).loss)
    assert all(v == pytest.approx(0.0, abs=1e-6) for v in distiller.last.values())
    assert set(distiller.last) == ({"logits", "hidden"} if mode == "logits+hidden" else {"logits"})
    _perturb(model), _perturb(plain)
    out = model(**batch)
    student, teacher = plain(**batch), distiller.teacher(**batch)
    key = "logits" if family == "vit" else "logits_per_image"
    kl = kl_logits(student[key], teacher[key], 2.0)
    if family == "clip":
        kl = (kl + kl_logits(student[key].t(), teacher[key].t(), 2.0)) / 2
    kl = kl.detach()
    assert distiller.last["logits"] == pytest.approx(float(kl), rel=1e-4) and float(kl) > 0
    if mode == "logits+hidden":
        assert distiller.last["hidden"] > 0
    expected = student.loss + weight * sum(distiller.last.values())
    assert float(out.loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    out.loss.backward()  # the term has a gradient path to the student only
    assert all(p.grad is None for p in distiller.teacher.parameters())
    # evaluation and no-grad forwards are the model's own
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).loss, plain(**batch).loss)
    model.eval(), plain.eval()
    torch.testing.assert_close(model(**batch).loss, plain(**batch).loss)
    distiller.close()
    model.train(), plain.train()
    torch.testing.assert_close(model(**batch).loss, plain(**batch).loss)


def test_trainer_run_distils_and_keeps_the_teacher_frozen(tmp_path):
    trainer = _trainer(tmp_path / "a")
    dense = copy.deepcopy(trainer.model).state_dict()
    callback = add_upop(trainer, ratio=0.5, round_to=1, interval=2, distill="logits", distill_temperature=2.0)
    teacher = callback.distiller.teacher
    seen = []
    trainer.add_callback(type("Probe", (transformers.TrainerCallback,), {
        "on_step_end": lambda self, *a, **k: seen.append(dict(callback.distiller.last))})())
    trainer.train()
    assert callback.plan is not None and len(seen) == 12
    assert seen[0]["logits"] == pytest.approx(0.0, abs=1e-6) and all(s["logits"] > 0 for s in seen[1:])
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(tensor, dense[name]), name
    assert callback.distiller is None  # hooks off after training
    # the distilled run differs from one without distillation
    plain = _trainer(tmp_path / "b")
    add_upop(plain, ratio=0.5, round_to=1, interval=2)
    plain.train()
    batch = _vit_batch()
    with torch.no_grad():
        assert not torch.allclose(trainer.model.eval()(**batch).logits, plain.model.eval()(**batch).logits)


@pytest.mark.slow
def test_resumed_distillation_equals_uninterrupted(tmp_path):
    def run(folder, stop=None, resume=None):
        trainer = _trainer(folder, save_strategy="steps", save_steps=4)
        callback = add_upop(trainer, ratio=0.5, round_to=1, interval=2, distill="logits+hidden")
        if stop:
            trainer.add_callback(type("Stop", (transformers.TrainerCallback,), {
                "on_step_end": lambda self, args, state, control, **k: setattr(
                    control, "should_training_stop", state.global_step == stop) or control})())
        trainer.train(resume_from_checkpoint=resume)
        return trainer, callback

    whole, cb = run(tmp_path / "whole")
    run(tmp_path / "cut", stop=6)  # stopped mid-search... resumed from checkpoint-4
    again, cb2 = run(tmp_path / "cut", resume=True)
    assert {n: g.kept for n, g in cb2.plan.groups.items()} == {n: g.kept for n, g in cb.plan.groups.items()}
    batch = _vit_batch()
    with torch.no_grad():
        torch.testing.assert_close(again.model.eval()(**batch).logits, whole.model.eval()(**batch).logits,
                                   atol=1e-6, rtol=0)


@pytest.mark.parametrize("kwargs, word", [({"distill": "kl"}, "distill must be one of"),
                                          ({"distill": "logits", "distill_weight": 0}, "distill_weight"),
                                          ({"distill": "logits", "distill_temperature": "hot"}, "distill_temperature"),
                                          ({"distill": "logits", "teacher_precision": "fp16"}, "teacher_precision")])
def test_bad_distill_settings_are_one_line_errors(kwargs, word):
    with pytest.raises(ConfigError, match=word) as err:
        UPopTrainerCallback(0.5, **kwargs)
    assert "\n" not in str(err.value)


def test_a_model_output_without_logits_is_refused():
    model = M.make_model("vit").train()

    class NoLogits(torch.nn.Module):  # a supported model whose output has a loss but no logits
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, **batch):
            out = self.inner(**batch)
            return transformers.modeling_outputs.BaseModelOutput(last_hidden_state=out.logits) | {"loss": out.loss}

    wrapped = NoLogits()
    TrainerDistiller(wrapped, "logits", teacher=model)
    with pytest.raises(ConfigError, match="logits_per_image or logits"):
        wrapped(**_vit_batch())
