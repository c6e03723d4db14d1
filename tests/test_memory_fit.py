"""Memory at LLM size (issue #29): ``gradient_checkpointing`` with the masks (the same mask and
weight gradients as without, for every registered tiny model whose class supports it; on through
the search, the retraining and a resume; turned on when resuming a run that ran without it; a class without it
refused), and the fit check that refuses, in one line and before the output folder, a model whose
training cannot fit in its GPU's free memory (:mod:`upop.measure.memory`)."""

from __future__ import annotations

import json

import pytest
import torch

import upop
import upop.engine.phases as phases
import upop.measure.memory as memory
from upop.arch import TINY
from upop.cli.main import main
from upop.data import write_shapes
from upop.errors import ConfigError
from upop.measure.memory import BYTES, MASK_BYTES_PER_UNIT, estimate, fits, free_bytes, gib
from upop.models.folders import make_model, make_processor
from upop.pruning.masks import attach_masks

from ._families import row_of
from ._forwards import FORWARDS

#: the registry's tiny models whose class transformers can checkpoint
CHECKPOINTABLE = [name for name in TINY if getattr(make_model(name), "supports_gradient_checkpointing", False)]
LLM = "llama"  # the decoder the end-to-end runs use (task lm)


def test_the_table_is_not_empty():
    assert LLM in CHECKPOINTABLE and len(CHECKPOINTABLE) > 1


# ----------------------------------------------------------------------------- the estimate


@pytest.mark.parametrize("precision", sorted(BYTES))
def test_the_estimate_counts_weights_gradients_adam_states_teacher_and_masks(precision):
    n, per = 1000, BYTES[precision]
    plain = estimate(n, precision)
    assert plain == 4 * n * per  # weights + gradients + exp_avg + exp_avg_sq
    assert estimate(n, precision, teacher="bf16") == plain + 2 * n
    assert estimate(n, precision, teacher="fp32", mask_units=10) == plain + 4 * n + 10 * MASK_BYTES_PER_UNIT
    assert fits(n, precision, None, plain) == (True, plain)
    assert fits(n, precision, None, plain - 1) == (False, plain)
    assert fits(n, precision, "bf16", plain + 2 * n - 1) == (False, plain + 2 * n)
    assert fits(n, precision, None, None) == (True, plain)  # not checked: fits


def test_free_memory_is_read_on_cuda_only(monkeypatch):
    """The device type decides: CUDA asks torch what is free on that GPU, the CPU is not checked."""
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: asked.append(device) or (123, 456))
    assert free_bytes("cpu") is None and free_bytes(torch.device("cpu")) is None and asked == []
    assert free_bytes("cuda:1") == 123 and asked == [torch.device("cuda:1")]


# ----------------------------------------------------------------------------- checkpointing with the masks


def _step(name: str, checkpointing: bool):
    """One training-mode forward/backward of tiny model ``name`` with masks attached: the mask and
    weight gradients, and how many times the masked producers ran."""
    model = make_model(name).train()
    if checkpointing:
        phases.enable_gradient_checkpointing(model)
    masks = attach_masks(model)
    runs = [0]
    for group in masks.groups:
        for producer in group.mask_producers:
            model.get_submodule(producer).register_forward_hook(lambda *_: runs.__setitem__(0, runs[0] + 1))
    torch.manual_seed(1)  # the same dropout draws (checkpointing replays the forward's RNG state)
    loss = sum(out.float().square().mean() for out in FORWARDS[row_of(name)](model))
    loss.backward()
    return ({k: p.grad.clone() for k, p in masks.items()},
            {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}, runs[0])


@pytest.mark.parametrize("name", CHECKPOINTABLE)
def test_checkpointing_gives_the_same_mask_and_weight_gradients(name):
    masks, weights, runs = _step(name, False)
    masks_gc, weights_gc, runs_gc = _step(name, True)
    assert runs_gc > runs, "no block was recomputed: checkpointing is not on"
    assert masks.keys() == masks_gc.keys() and weights.keys() == weights_gc.keys()
    for expected, got in [*zip(masks.values(), masks_gc.values()), *zip(weights.values(), weights_gc.values())]:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()) + 1e-12)
    assert any(g.abs().sum() > 0 for g in masks.values())


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory):
    data = tmp_path_factory.mktemp("lm-data")
    write_shapes("lm", data, train=8, val=4, test=4, image_size=32, seed=0)
    return data


def _settings(**settings) -> upop.UPopConfig:
    return upop.UPopConfig(**{"search_epochs": 1, "retrain_epochs": 1, "batch_size": 4, "lr": 1e-3, "interval": 1,
                              "checkpoint_every": 10**6, "latency_time": 0.02, "eval_batch_size": 8, **settings})


def _compress(data, out, **kw):
    processor = make_processor(LLM, 32)
    model = make_model(LLM, vocab_size=len(processor))
    settings = {k: kw.pop(k) for k in list(kw) if k not in ("resume", "stop_after")}
    return upop.compress(model, "lm", data, processor=processor, config=_settings(**settings), out_dir=out,
                         progress=False, log=lambda _: None, **kw)


def _one_line(info) -> str:
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_checkpointing_holds_through_search_retraining_and_resume(lm_data, tmp_path, monkeypatch):
    """On in the search, and in the retraining of a run resumed after its pruning; the report and
    run.json record it; a run stopped without it resumes with it (the gradients are the same)."""
    enabled = []

    def spy(model):
        enable(model)
        enabled.append((getattr(model, "upop_plan", None) is not None,
                        any(getattr(m, "gradient_checkpointing", False) for m in model.modules())))

    enable = phases.enable_gradient_checkpointing
    monkeypatch.setattr(phases, "enable_gradient_checkpointing", spy)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):  # 2 search steps, then the pruning: stopped before retraining
        _compress(lm_data, out, gradient_checkpointing=True, stop_after=3)
    assert enabled == [(False, True)]  # the search's dense model
    result = _compress(lm_data, out, gradient_checkpointing=True, resume=True)
    assert enabled == [(False, True), (True, True)]  # the resumed retraining's pruned model
    assert result.plan.achieved_ratio["params"] > 0
    assert result.report["settings"]["gradient_checkpointing"] is True
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["config"]["gradient_checkpointing"] is True
    assert run_json["settings"]["values"]["gradient_checkpointing"] is True
    model = make_model(LLM, vocab_size=len(make_processor(LLM, 32)))
    units = sum(g.num_units for g in upop.find_groups(model))
    assert result.report["memory"]["estimate_bytes"] == estimate(sum(p.numel() for p in model.parameters()), "fp32",
                                                                 mask_units=units)
    assert result.report["memory"]["available_bytes"] is None  # the CPU is not checked
    # it does not change what the run computes: a run stopped without it resumes with it (out of memory)
    other = tmp_path / "other"
    with pytest.raises(KeyboardInterrupt):
        _compress(lm_data, other, gradient_checkpointing=False, stop_after=3)
    resumed = _compress(lm_data, other, gradient_checkpointing=True, resume=True)
    assert enabled[-1] == (True, True)
    assert resumed.plan.groups == result.plan.groups


def test_a_class_without_checkpointing_is_refused_before_the_folder(lm_data, tmp_path, monkeypatch):
    cls = type(make_model(LLM))
    monkeypatch.setattr(cls, "supports_gradient_checkpointing", False)
    with pytest.raises(ConfigError) as info:
        _compress(lm_data, tmp_path / "out", gradient_checkpointing=True)
    message = _one_line(info)
    assert cls.__name__ in message and "gradient_checkpointing" in message
    assert not (tmp_path / "out").exists()


def test_gradient_checkpointing_must_be_a_bool():
    with pytest.raises(ConfigError, match="gradient_checkpointing='yes' is not allowed.*true or false"):
        upop.UPopConfig(gradient_checkpointing="yes")


# ----------------------------------------------------------------------------- the fit check


def _free(monkeypatch, n_bytes: int) -> None:
    """The run's device reads as a GPU with ``n_bytes`` free (the CPU is not checked otherwise);
    the model's weights, on that device already, count as available beside them."""
    monkeypatch.setattr(memory, "free_bytes", lambda device: n_bytes)


def test_a_model_that_cannot_fit_is_one_line_and_exit_2_before_the_folder(lm_data, tmp_path, monkeypatch, capsys):
    model_dir = tmp_path / "model"
    assert main(["make-model", LLM, "--out", str(model_dir), "--image-size", "32"]) == 0
    _free(monkeypatch, 4096)
    out = tmp_path / "out"
    code = main(["compress", "--model", str(model_dir), "--task", "lm", "--data", str(lm_data), "--out", str(out),
                 "--search-epochs", "1", "--retrain-epochs", "1", "--batch-size", "4", "--interval", "1",
                 "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    line = err[0]
    for needle in ("LlamaForCausalLM", "does not fit", f"({gib(4096)} free + ", "a smaller model",
                   "--gradient-checkpointing shrinks activations only", "FSDP"):
        assert needle in line, line
    assert not out.exists()


def test_the_teacher_counts_only_when_the_run_keeps_one(lm_data, tmp_path, monkeypatch):
    """Memory for the run with a bf16 teacher but not with an fp32 one: a run that distils with the
    fp32 teacher (the lm task cannot cache its teacher) is refused, naming what to try; with
    --teacher-precision bf16 the same run passes the check."""
    processor = make_processor(LLM, 32)
    model = make_model(LLM, vocab_size=len(processor))
    n = sum(p.numel() for p in model.parameters())
    plain = estimate(n, "fp32", mask_units=sum(g.num_units for g in upop.find_groups(model)))
    _free(monkeypatch, plain + 2 * n - 4 * n)  # with the fp32 weights already there: room for a bf16 teacher only
    with pytest.raises(ConfigError) as info:
        _compress(lm_data, tmp_path / "distilled", distill="logits")
    message = _one_line(info)
    assert f"needs at least {gib(plain + 4 * n)} GiB" in message and f"{gib(plain + 2 * n)} GiB is available" in message
    assert "--distill none" in message
    assert "--teacher-precision bf16" in message and not (tmp_path / "distilled").exists()
    with pytest.raises(KeyboardInterrupt):  # past the check: the run started (and is stopped at its first step)
        _compress(lm_data, tmp_path / "bf16", distill="logits", teacher_precision="bf16", stop_after=1)


def test_the_estimate_follows_the_dtype_the_weights_are_held_in(monkeypatch):
    """A model loaded in bf16 trains in bf16 (its gradients and AdamW's states too): half the
    fp32 estimate; the weights already on the device count as available."""
    model = make_model(LLM)
    n = sum(p.numel() for p in model.parameters())
    half = model.to(torch.bfloat16)
    assert memory.weights_precision(half) == "bf16"
    _free(monkeypatch, 4 * 2 * n - 2 * n)
    assert memory.check_fits(half, "cpu")["estimate_bytes"] == 4 * 2 * n
    with pytest.raises(ConfigError, match=r"in fp32\) does not fit on cpu"):
        memory.check_fits(half.float(), "cpu")
