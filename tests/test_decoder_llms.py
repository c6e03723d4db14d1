"""Generating models (issue #29): for every registered tiny model that generates (decoder LLMs,
LLaVA, BLIP's captioner and VQA model), the pruned model generates the masked model's greedy tokens
(with and without the KV cache) from prompts with an image where its class reads images, at every
attention granularity; the kept rotary pairs turn at their dense frequencies; per-layer widths
rebuild from the folder. A family registered later that generates is in this table by its
registration."""

from __future__ import annotations

import pytest
import torch

import upop
from upop.arch import CLASSES, TINY
from upop.arch._spec import ROPE_PAIRS
from upop.models.folders import make_model

#: tiny models of the registry that generate
GENERATORS = [name for name, tiny in TINY.items() if make_model(name).can_generate()]
GRANULARITIES = ("head-dim", "head", "both")


def _reads_images(model) -> bool:
    return "image" in CLASSES[type(model).__name__][1].reads


def _prompts(model) -> list[dict[str, torch.Tensor]]:
    """Three prompts of 3, 7 and 12 word ids (below 100: no special or image token), each with an
    image where the class reads images; a model that marks the image's place by tokens (LLaVA's
    ``image_token_id``) gets them after the first id, ``image_seq_length`` of them."""
    g = torch.Generator().manual_seed(0)
    config = model.config
    prompts = []
    for n in (3, 7, 12):
        ids = torch.randint(9, min(100, config.get_text_config().vocab_size), (1, n), generator=g)
        prompt = {"input_ids": ids}
        if _reads_images(model):
            size = config.vision_config.image_size
            prompt["pixel_values"] = torch.randn(1, 3, size, size, generator=g)
            if getattr(config, "image_token_id", None) is not None:
                image = torch.full((1, config.image_seq_length), config.image_token_id)
                prompt["input_ids"] = torch.cat([ids[:, :1], image, ids[:, 1:]], dim=1)
        prompts.append(prompt)
    return prompts


def _drop_some(masks) -> None:
    """Keep unit 0 and every other unit after it; drop the rest (every group loses some)."""
    with torch.no_grad():
        for _, m in masks.items():
            keep = torch.zeros(m.numel())
            keep[::2] = 1.0
            m.copy_(keep)


def _greedy(model, prompt, use_cache=True) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**prompt, max_new_tokens=8, do_sample=False, use_cache=use_cache)


def test_the_table_is_not_empty():
    assert GENERATORS, "no registered tiny model generates text"
    assert any(_reads_images(make_model(name)) for name in GENERATORS), "no generator reads images"


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("name", GENERATORS)
def test_pruned_generates_the_masked_tokens(name, granularity, tmp_path):
    model = make_model(name).eval()
    masks = upop.attach_masks(model, upop.find_groups(model, granularity=granularity))
    _drop_some(masks)
    prompts = _prompts(model)
    masked = [_greedy(model, p) for p in prompts]
    plan = upop.prune(model, masks)
    assert plan.achieved_ratio["params"] > 0.2
    pruned = [_greedy(model, p) for p in prompts]
    uncached = [_greedy(model, p, use_cache=False) for p in prompts]
    for a, b, c in zip(masked, pruned, uncached):
        assert torch.equal(a, b) and torch.equal(b, c)
    # per-layer widths rebuild from the folder; the loaded model generates the same tokens
    loaded = upop.load_compressed(upop.save_compressed(model, tmp_path / "c")).eval()
    for prompt, tokens in zip(prompts, pruned):
        assert torch.equal(_greedy(loaded, prompt), tokens)


@pytest.mark.parametrize("name", GENERATORS)
def test_kept_rotary_pairs_keep_their_frequencies(name):
    """A pruned attention with rotary pairs records the dense index of each kept pair and rotates
    them at their dense frequencies: over 60 positions its logits are the masked model's, and
    they are not when the pruned channels take the first frequencies instead (what recomputing the
    rotary embedding for the narrower head would give)."""
    model = make_model(name).eval()
    groups = upop.find_groups(model)
    rotary = [g for g in groups if g.kind == "attention" and g.rope]
    if not rotary:
        pytest.skip(f"{name} has no rotary attention")
    masks = upop.attach_masks(model, groups)
    _drop_some(masks)
    vocab = min(100, model.config.get_text_config().vocab_size)  # word ids: no image token
    ids = torch.randint(9, vocab, (1, 60), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        masked = model(input_ids=ids).logits
        upop.prune(model, masks)
        pruned = model(input_ids=ids).logits
    exact = (masked - pruned).abs().max()
    assert exact <= 1e-5
    for g in rotary:
        module = model.get_submodule(g.module)
        assert getattr(module, ROPE_PAIRS) == list(range(0, g.channel_units, 2))
        module.__dict__.pop("_rope_index", None)
        setattr(module, ROPE_PAIRS, list(range(len(getattr(module, ROPE_PAIRS)))))  # the first frequencies
    with torch.no_grad():
        wrong = (masked - model(input_ids=ids).logits).abs().max()
    assert wrong > 1e-4 and wrong > 100 * exact  # random tiny weights: small logits, a clear gap
