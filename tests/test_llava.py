"""Vision-language decoders (LLaVA, issue #29): the vision blocks after the feature layer are left
out of the search and untouched by pruning; the FLOPs costs count the tokens each tower really
sees (the LLM: text plus image tokens); towers the spec does not prune are refused in one line.
Every row of the engine table (``tests/_families.py``) whose spec leaves blocks out is checked."""

from __future__ import annotations

import dataclasses

from types import SimpleNamespace

import pytest
import torch

import upop
import upop.models.folders as M
from upop.arch import TINY, get_spec, pairs
from upop.arch.llava import feature_blocks
from upop.cli.main import main
from upop.errors import UnsupportedModelError

from ._families import FAMILIES, prune_every_third
from ._forwards import ids, pixels


def _left_out(model) -> list[tuple[str, int, int]]:
    """(tower path, blocks that are groups, blocks in all) of each tower of ``model``'s spec that
    leaves blocks out (``Tower.blocks``)."""
    found = []
    for tower in get_spec(model).towers:
        if tower.blocks is None or (tower.only and model.config.model_type not in tower.only):
            continue
        for path in tower.paths:
            try:
                blocks = model.get_submodule(path)
            except AttributeError:
                continue
            found.append((path, tower.blocks(model.config), len(blocks)))
            break
    return found


_BUILT = {row: build() for row, (build, _, _) in FAMILIES.items()}
#: rows whose spec leaves blocks out of the search
ROWS = sorted(row for row, model in _BUILT.items() if any(n < total for _, n, total in _left_out(model)))
#: rows of models that read an image through image tokens in their text (LLaVA's ``image_token_id``)
IMAGE_ROWS = sorted(row for row, model in _BUILT.items() if getattr(model.config, "image_token_id", None) is not None)


def test_the_tables_are_not_empty():
    assert ROWS, "no row of the engine table leaves a block out of the search"
    assert IMAGE_ROWS, "no row of the engine table reads image tokens"


@pytest.mark.parametrize("row", ROWS)
def test_blocks_after_the_feature_layer_are_no_groups_and_stay_dense(row):
    build, forward, _ = FAMILIES[row]
    model = build()
    groups = upop.find_groups(model)
    with torch.no_grad():
        dense = forward(model)
    for path, n, total in _left_out(model):
        assert n < total
        named = {int(g.name[len(path) + 1:].split(".")[0]) for g in groups if g.name.startswith(path + ".")}
        assert named == set(range(n))
        late = model.get_submodule(path)[n:]
        # their output never reaches the model's: new weights there change nothing ...
        before = {k: v.clone() for k, v in late.state_dict().items()}
        with torch.no_grad():
            for p in late.parameters():
                p.add_(torch.randn_like(p))
            assert all(torch.equal(a, b) for a, b in zip(dense, forward(model)))
            late.load_state_dict(before)
            # ... while the last block that is a group does reach it
            last = model.get_submodule(path)[n - 1]
            saved = {k: v.clone() for k, v in last.state_dict().items()}
            for p in last.parameters():
                p.add_(torch.randn_like(p))
            assert any((a - b).abs().max() > 1e-4 for a, b in zip(dense, forward(model)))
            last.load_state_dict(saved)
    prune_every_third(model)
    for path, n, _ in _left_out(model):
        late = model.get_submodule(path)[n:]
        assert all(torch.equal(v, before[k]) for k, v in late.state_dict().items())


@pytest.mark.parametrize("layers, blocks", [(-2, 3), (-1, 4), (0, 0), (2, 2), ([-2, 1], 3), ([1, -1], 4)])
def test_feature_blocks(layers, blocks):
    """Hidden state ``k`` is the output of block ``k - 1`` (0: the embeddings); of 4 blocks."""
    config = SimpleNamespace(vision_feature_layer=layers, vision_config=SimpleNamespace(num_hidden_layers=4))
    assert feature_blocks(config) == blocks


@pytest.mark.parametrize("granularity", ["head-dim", "head"])
@pytest.mark.parametrize("row", IMAGE_ROWS)
def test_flop_costs_count_text_and_image_tokens(row, granularity):
    """The FLOPs pruning removes are what torch's flop counter sees on a batch of 12 text tokens
    and one image's tokens: the costs' tokens (``text_tokens=12`` plus the image's for the LLM, the
    vision tower's own) are the forward's."""
    model = FAMILIES[row][0]()
    config = model.config
    text = ids()
    x = {"input_ids": torch.cat([text[:, :1], torch.full((2, config.image_seq_length), config.image_token_id),
                                 text[:, 1:]], 1),
         "pixel_values": pixels()}
    groups = upop.find_groups(model, text_tokens=text.shape[1], granularity=granularity)
    assert {g.tokens_q for g in groups if g.modality == "text"} == {x["input_ids"].shape[1]}
    dense = upop.count_flops(model, x)
    masks = upop.attach_masks(model, groups)
    with torch.no_grad():
        for _, m in masks.items():
            keep = torch.ones(m.numel())
            keep[1::2] = 0.0
            m.copy_(keep)
    removed = sum(g.flop_cost * int((masks[g.name] == 0).sum()) for g in masks.groups)
    upop.prune(model, masks)
    assert removed > 0 and dense - upop.count_flops(model, x) == 2 * removed  # a batch of 2


@pytest.mark.parametrize("row", IMAGE_ROWS)
def test_an_unknown_language_model_is_refused_in_one_line(row):
    """A LLaVA whose language model no registered decoder family prunes (OLMo here)."""
    import transformers

    dense = _BUILT[row]
    config = dense.config.to_dict()
    config["text_config"] = transformers.OlmoConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                    intermediate_size=64, vocab_size=128).to_dict()
    model = type(dense)(type(dense.config).from_dict(config))
    with pytest.raises(UnsupportedModelError, match=r"language model 'olmo' is not one upop prunes.*llama") as exc:
        upop.find_groups(model)
    assert "\n" not in str(exc.value)


#: registered tiny models that read an image through image tokens
CHAT_TINY = sorted(name for name in TINY if getattr(M.make_model(name).config, "image_token_id", None) is not None)


@pytest.mark.parametrize("name", CHAT_TINY)
def test_make_model_writes_a_processor_with_a_chat_template(name, tmp_path):
    """``upop make-model`` writes a folder whose processor (loaded back offline) turns a chat with an
    image into the model's inputs: the template's own ``<bos>``, one image token per image feature,
    only Shapes words; the model generates from them."""
    import numpy as np
    from PIL import Image

    assert main(["make-model", name, "--out", str(tmp_path / "m"), "--image-size", "32"]) == 0
    model, processor = M.load_any(tmp_path / "m")
    tokenizer, config = processor.tokenizer, model.config
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what shape is red"}]},
                {"role": "assistant", "content": "a circle"}, {"role": "user", "content": "and blue"}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    inputs = processor(images=image, text=text, return_tensors="pt", add_special_tokens=False)
    ids = inputs["input_ids"][0].tolist()
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert ids.count(config.image_token_id) == config.image_seq_length
    assert tokenizer.unk_token_id not in ids
    assert inputs["pixel_values"].shape[-1] == config.vision_config.image_size
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 1 and len(ids) < out.shape[1] <= len(ids) + 3


def test_a_tiny_model_made_for_no_task_is_in_no_pair(monkeypatch):
    """``TinyModel.data_task=None`` (a family in progress: no task serves its class yet): make-model
    builds it, no (tiny model, task) pair names it."""
    first = next(iter(TINY.values()))
    monkeypatch.setitem(TINY, "no-task", dataclasses.replace(first, name="no-task", data_task=None))
    assert not [pair for pair in pairs() if pair[0] == "no-task"]
    assert [pair for pair in pairs() if pair[0] == first.name]
    assert type(M.make_model("no-task")).__name__ == first.model_class
