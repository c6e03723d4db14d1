"""Hugging Face conventions of compressed models: ``save_pretrained`` writes a folder that
``load_compressed`` reads, ``load_compressed`` takes ``from_pretrained``'s loading keywords, and
the Segmenter behaves like a transformers model (outputs, gradient checkpointing, Auto classes)."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import transformers

import upop
import upop.models.folders as M
from upop.checkpoint.safe_load import UPOP_INDEX
from upop.errors import ConfigError

from ._families import FAMILIES
from ._forwards import pixels as _pixels
from .test_engine import _random_masks

#: families whose transformers classes compute attention with ``sdpa`` as well as ``eager``
SDPA = ("bert", "clip", "deit", "segmenter", "vit")


def _pruned(family: str, seed: int = 3):
    model = FAMILIES[family][0]()
    masks = upop.attach_masks(model)
    _random_masks(masks, seed=seed)
    upop.prune(model, masks)
    return model


def _outputs(family: str, model) -> list[torch.Tensor]:
    with torch.no_grad():
        return [t.float() for t in FAMILIES[family][1](model)]


def _saved(family: str, folder):
    model = _pruned(family)
    upop.save_compressed(model, folder)
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_save_pretrained_writes_a_compressed_checkpoint(family, tmp_path):
    model = _pruned(family)
    model.save_pretrained(tmp_path / "a")  # a freshly pruned model
    first = upop.load_compressed(tmp_path / "a")
    first.save_pretrained(tmp_path / "b")  # a loaded one: what Trainer.save_model calls
    second = upop.load_compressed(tmp_path / "b")
    assert type(second) is type(model)
    for want, got in zip(_outputs(family, model), _outputs(family, second)):
        assert torch.equal(want, got)
    plans = [json.loads((tmp_path / d / "upop_plan.json").read_text()) for d in "ab"]
    assert plans[0] == plans[1] == json.loads(model.upop_plan.to_json())


def test_trainer_save_model_and_original_format(tmp_path):
    """Trainer.save_model of a loaded model, a deep copy's save_pretrained, and transformers'
    original names in shards all load."""
    model = _saved("vit", tmp_path / "c")
    loaded = upop.load_compressed(tmp_path / "c")
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True)
    transformers.Trainer(model=loaded, args=args).save_model(str(tmp_path / "trainer"))
    copy.deepcopy(loaded).save_pretrained(tmp_path / "copy")
    loaded.save_pretrained(tmp_path / "orig", save_original_format=True, max_shard_size="20KB")
    stored = json.loads((tmp_path / "orig" / UPOP_INDEX).read_text())["weight_map"]
    assert any(".attention.attention.query." in k for k in stored)  # transformers renamed them
    for folder in ("trainer", "copy", "orig"):
        again = upop.load_compressed(tmp_path / folder)
        for want, got in zip(_outputs("vit", model), _outputs("vit", again)):
            assert torch.equal(want, got)


@pytest.mark.parametrize("family", ["clip", "segmenter", "vit"])
def test_dtype(family, tmp_path):
    model = _saved(family, tmp_path / "c")
    want = _outputs(family, model)
    for kwargs in ({"dtype": torch.bfloat16}, {"torch_dtype": "bfloat16"}):
        half = upop.load_compressed(tmp_path / "c", **kwargs)
        assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
        for a, b in zip(want, _outputs(family, half)):
            assert (a - b).abs().max().item() <= 0.05 * a.abs().max().item() + 1e-2
    half.save_pretrained(tmp_path / "bf16")
    assert {p.dtype for p in upop.load_compressed(tmp_path / "bf16").parameters()} == {torch.float32}
    assert {p.dtype for p in upop.load_compressed(tmp_path / "bf16", dtype="auto").parameters()} == {torch.bfloat16}
    assert {p.dtype for p in upop.load_compressed(tmp_path / "c", dtype="auto").parameters()} == {torch.float32}


@pytest.mark.parametrize("family", SDPA)
def test_attn_implementation(family, tmp_path):
    _saved(family, tmp_path / "c")
    eager = upop.load_compressed(tmp_path / "c", attn_implementation="eager")
    sdpa = upop.load_compressed(tmp_path / "c", attn_implementation="sdpa")
    assert (eager.config._attn_implementation, sdpa.config._attn_implementation) == ("eager", "sdpa")
    for a, b in zip(_outputs(family, eager), _outputs(family, sdpa)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_device_map(tmp_path):
    model = _saved("segmenter", tmp_path / "c")
    want = _outputs("segmenter", model)
    for device_map in ("auto", "cpu", torch.device("cpu"), {"": "cpu"}, "sequential"):
        placed = upop.load_compressed(tmp_path / "c", device_map=device_map)
        assert {p.device.type for p in placed.parameters()} == {"cpu"}
        assert all(torch.equal(a, b) for a, b in zip(want, _outputs("segmenter", placed)))


@pytest.mark.parametrize("kwargs, error, words", [
    ({"dtype": torch.int8}, ConfigError, "floating-point"),
    ({"dtype": "float33"}, ConfigError, "float33"),
    ({"attn_implementation": "no_such_kernel"}, ConfigError, "no_such_kernel"),
    ({"device_map": "gpu9"}, ConfigError, "gpu9"),
    ({"device_map": {"": "disk"}}, ConfigError, "disk"),
    ({"device": "cpu", "device_map": "cpu"}, ConfigError, "both"),
    ({"trust_remote_code": True}, ConfigError, "never runs code"),
    ({"low_cpu_mem_usage": True}, TypeError, "low_cpu_mem_usage"),
])
def test_bad_loading_options(kwargs, error, words, tmp_path):
    _saved("vit", tmp_path / "c")
    with pytest.raises(error, match=words):
        upop.load_compressed(tmp_path / "c", **kwargs)


def test_sdpa_refused_where_unsupported(tmp_path):
    _saved("blip-caption", tmp_path / "c")
    with pytest.raises(ConfigError, match="sdpa"):
        upop.load_compressed(tmp_path / "c", attn_implementation="sdpa")


# --- the Segmenter as a transformers model ---------------------------------------------------


def test_segmenter_outputs_attentions_and_hidden_states():
    model = M.make_model("segmenter")
    model.set_attn_implementation("eager")
    out = model(pixel_values=_pixels(), output_attentions=True, output_hidden_states=True)
    vision, layers = model.config.vision_config, model.config.decoder_layers
    tokens = (32 // vision.patch_size) ** 2 + 1
    decoder_tokens = tokens - 1 + model.config.num_labels
    assert [h.shape for h in out.hidden_states] == [(2, tokens, 32)] * (vision.num_hidden_layers + 1)
    assert [a.shape for a in out.attentions] == [(2, 4, tokens, tokens)] * vision.num_hidden_layers
    assert [h.shape for h in out.decoder_hidden_states] == [(2, decoder_tokens, 32)] * (layers + 1)
    assert [a.shape for a in out.decoder_attentions] == [(2, 4, decoder_tokens, decoder_tokens)] * layers
    assert torch.allclose(out.decoder_attentions[0].sum(-1), torch.ones(2, 4, decoder_tokens), atol=1e-5)
    plain = model(pixel_values=_pixels())
    assert plain.hidden_states is None and plain.attentions is None and torch.equal(plain.logits, out.logits)
    assert torch.equal(model(pixel_values=_pixels(), return_dict=False)[0], out.logits)


def _segmenter_grads(checkpointing: bool):
    model = M.make_model("segmenter").train()
    if checkpointing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # renamed activation_checkpointing_enable in v5
            model.gradient_checkpointing_enable()
    calls = []
    for block in (model.vit.layers[0], model.decoder.layers[0]):
        block.mlp.fc1.register_forward_hook(lambda *_: calls.append(1))
    labels = torch.randint(0, model.config.num_labels, (2, 32, 32), generator=torch.Generator().manual_seed(0))
    model(pixel_values=_pixels(), labels=labels).loss.backward()
    return {k: p.grad for k, p in model.named_parameters()}, len(calls)


def test_segmenter_gradient_checkpointing():
    assert M.make_model("segmenter").supports_gradient_checkpointing
    plain, plain_calls = _segmenter_grads(False)
    checkpointed, checkpointed_calls = _segmenter_grads(True)
    assert (plain_calls, checkpointed_calls) == (2, 4)  # the blocks are run again in the backward pass
    assert plain.keys() == checkpointed.keys() and all(g is not None for g in plain.values())
    for key, grad in plain.items():
        assert torch.allclose(grad, checkpointed[key], atol=1e-6), key


def test_segmenter_auto_classes(tmp_path):
    model = M.make_model("segmenter")
    model.save_pretrained(tmp_path / "dense")
    config = transformers.AutoConfig.from_pretrained(tmp_path / "dense")
    assert type(config) is type(model.config)
    auto = transformers.AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "dense")
    assert type(auto) is type(model)
    with torch.no_grad():
        assert torch.allclose(auto(pixel_values=_pixels()).logits, model(pixel_values=_pixels()).logits, atol=1e-5)
    assert type(transformers.AutoModelForSemanticSegmentation.from_config(config)) is type(model)
