"""BLIP's ``[ENC]`` token: when ``text_config.enc_token_id`` is set (the BLIP importers set it), the
image-grounded text encoder reads it in place of the first token, in the ITM head of retrieval
(training and re-ranking) and for the VQA question (training, rank and generate), as BLIP's
models/blip_retrieval.py and models/blip_vqa.py do; without it the ids go in as given."""

from __future__ import annotations

import pytest
import torch

from upop.models.folders import make_model
from upop.tasks._blip import encoder_ids

ENC = 7


def _inputs(model, batch=3, length=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    ids = torch.randint(10, cfg.text_config.vocab_size, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    pixels = torch.randn(batch, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, generator=g)
    return ids, mask, pixels


def _encoder_states(model, ids, mask, pixels):
    image = model.vision_model(pixel_values=pixels).last_hidden_state
    image_mask = torch.ones(image.shape[:-1], dtype=torch.long)
    return model.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image,
                              encoder_attention_mask=image_mask).last_hidden_state, image


def _setup(family, enc):
    """A tiny eval-mode model of ``family`` with ``enc_token_id = enc``, inputs, and the ids the
    image-grounded encoder should read (the first token replaced when ``enc`` is set)."""
    model = make_model(family).eval()
    model.config.text_config.enc_token_id = enc
    ids, mask, pixels = _inputs(model)
    expected_ids = ids.clone()
    if enc is not None:
        expected_ids[:, 0] = enc
    return model, ids, mask, pixels, expected_ids


@pytest.mark.parametrize("enc", [None, ENC])
def test_encoder_ids(enc):
    model = make_model("blip-retrieval")
    model.config.text_config.enc_token_id = enc
    ids = torch.arange(12).view(2, 6) + 20
    out = encoder_ids(model, ids)
    assert torch.equal(ids, torch.arange(12).view(2, 6) + 20)  # the caller's ids are not changed
    if enc is None:
        assert out is ids
    else:
        assert out[:, 0].tolist() == [ENC, ENC] and torch.equal(out[:, 1:], ids[:, 1:])


@torch.no_grad()
@pytest.mark.parametrize("enc", [None, ENC])
def test_itm_reads_the_enc_token(enc):
    from upop.tasks.blip_retrieval import _itm_logits

    model, ids, mask, pixels, expected_ids = _setup("blip-retrieval", enc)
    states, image = _encoder_states(model, expected_ids, mask, pixels)
    got = _itm_logits(model, ids, mask, image)
    torch.testing.assert_close(got, model.itm_head(states[:, 0, :]))
    if enc is not None:  # the token matters: the logits differ from the [CLS] ones
        plain, _ = _encoder_states(model, ids, mask, pixels)
        assert not torch.allclose(got, model.itm_head(plain[:, 0, :]))


@torch.no_grad()
@pytest.mark.parametrize("enc", [None, ENC])
def test_vqa_question_reads_the_enc_token(enc):
    from upop.config import UPopConfig
    from upop.tasks import get_task
    from upop.tasks._blip import decoder_inputs
    from upop.tasks.vqa_rank import question_states

    model, ids, mask, pixels, expected_ids = _setup("blip-vqa", enc)
    states, _ = _encoder_states(model, expected_ids, mask, pixels)
    torch.testing.assert_close(question_states(model, pixels, ids, mask), states)

    answers = torch.randint(10, model.config.text_config.vocab_size, (3, 4))
    answer_mask = torch.ones_like(answers)
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "answer_ids": answers,
             "answer_mask": answer_mask}
    task = get_task("vqa").configure(UPopConfig())
    dec, _ = decoder_inputs(answers, answer_mask, model)
    labels = dec.masked_fill(answer_mask == 0, -100)
    expected = model(input_ids=expected_ids, attention_mask=mask, pixel_values=pixels, decoder_input_ids=dec,
                     decoder_attention_mask=answer_mask, labels=labels).loss
    torch.testing.assert_close(task.loss(model, batch), expected)
