"""``upop import blip-nlvr``: a tiny checkpoint in salesforce/BLIP's NLVR key layout round-trips into
``BlipForNLVR`` exactly, computes what BLIP's NLVR forward computes, and bad files are one-line errors.
Also: ``BlipForNLVR``'s two cross-attentions per layer are two fusion groups."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import upop
from upop.cli.main import main
from upop.models.importers import SKIPPED, blip_to_upop
from upop.models.folders import load_any

# tiny sizes; widths are multiples of 64 (BLIP's head width): 2 heads each
V_WIDTH, V_MLP, PATCH, IMAGE, T_WIDTH, T_MLP, LAYERS, MERGE_FROM, MAX_POS = 128, 192, 16, 32, 128, 160, 3, 1, 24


def blip_nlvr_layout(vocab: int) -> dict[str, tuple]:
    """Key -> shape of a BLIP NLVR state dict (BLIP_NLVR: ``visual_encoder`` is models/vit.py's
    VisionTransformer, ``text_encoder`` models/nlvr_encoder.py's BertModel, then ``cls_head``)."""
    w, h = V_WIDTH, T_WIDTH
    ln = lambda p, d: {f"{p}.weight": (d,), f"{p}.bias": (d,)}  # noqa: E731 - LayerNorm
    lin = lambda p, o, i: {f"{p}.weight": (o, i), f"{p}.bias": (o,)}  # noqa: E731 - Linear(i, o)
    keys = {"visual_encoder.cls_token": (1, 1, w), "visual_encoder.pos_embed": (1, (IMAGE // PATCH) ** 2 + 1, w),
            "visual_encoder.patch_embed.proj.weight": (w, 3, PATCH, PATCH), "visual_encoder.patch_embed.proj.bias": (w,)}
    for i in range(LAYERS):
        b = f"visual_encoder.blocks.{i}"
        keys |= ln(f"{b}.norm1", w) | lin(f"{b}.attn.qkv", 3 * w, w) | lin(f"{b}.attn.proj", w, w)
        keys |= ln(f"{b}.norm2", w) | lin(f"{b}.mlp.fc1", V_MLP, w) | lin(f"{b}.mlp.fc2", w, V_MLP)
    keys |= ln("visual_encoder.norm", w)
    e = "text_encoder.embeddings"
    keys |= {f"{e}.position_ids": (1, MAX_POS), f"{e}.word_embeddings.weight": (vocab, h),
             f"{e}.position_embeddings.weight": (MAX_POS, h)} | ln(f"{e}.LayerNorm", h)
    for i in range(LAYERS):
        t = f"text_encoder.encoder.layer.{i}"
        for n in ("query", "key", "value"):
            keys |= lin(f"{t}.attention.self.{n}", h, h)
            for k in (0, 1):
                keys |= lin(f"{t}.crossattention.self{k}.{n}", h, h if n == "query" else w)
        keys |= lin(f"{t}.attention.output.dense", h, h) | ln(f"{t}.attention.output.LayerNorm", h)
        keys |= lin(f"{t}.crossattention.output.dense0", h, h) | lin(f"{t}.crossattention.output.dense1", h, h)
        if i >= MERGE_FROM:
            keys |= lin(f"{t}.crossattention.output.merge_layer", h, 2 * h)
        keys |= ln(f"{t}.crossattention.output.LayerNorm", h)
        keys |= lin(f"{t}.intermediate.dense", T_MLP, h) | lin(f"{t}.output.dense", h, T_MLP) | ln(f"{t}.output.LayerNorm", h)
    return keys | lin("cls_head.0", h, h) | lin("cls_head.2", 2, h)


def blip_state_dict(vocab: int = 74, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=g) * 0.2 for k, s in blip_nlvr_layout(vocab).items()}
    sd["text_encoder.embeddings.position_ids"] = torch.arange(MAX_POS).unsqueeze(0)
    return sd


def reference_logits(sd, pixels, ids, mask, enc_id):
    """BLIP's NLVR forward, written from its code with plain tensor ops on BLIP's key names."""
    def lin(x, p):
        return F.linear(x, sd[p + ".weight"], sd[p + ".bias"])

    def ln(x, p, eps):
        return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)

    def heads(x, n):
        return x.view(*x.shape[:2], n, -1).transpose(1, 2)

    def attend(q, k, v, n, add=None):
        q, k, v = heads(q, n), heads(k, n), heads(v, n)
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + (0 if add is None else add)
        return (s.softmax(-1) @ v).transpose(1, 2).flatten(2)

    def vit(img):
        x = F.conv2d(img, sd["visual_encoder.patch_embed.proj.weight"], sd["visual_encoder.patch_embed.proj.bias"],
                     stride=PATCH).flatten(2).transpose(1, 2)
        x = torch.cat([sd["visual_encoder.cls_token"].expand(len(img), -1, -1), x], 1) + sd["visual_encoder.pos_embed"]
        n = V_WIDTH // 64
        for i in range(LAYERS):
            b = f"visual_encoder.blocks.{i}"
            y = lin(ln(x, b + ".norm1", 1e-6), b + ".attn.qkv")
            q, k, v = y.view(*y.shape[:2], 3, -1).unbind(2)
            x = x + lin(attend(q, k, v, n), b + ".attn.proj")
            x = x + lin(F.gelu(lin(ln(x, b + ".norm2", 1e-6), b + ".mlp.fc1")), b + ".mlp.fc2")
        return ln(x, "visual_encoder.norm", 1e-6)

    img0, img1 = vit(pixels[:, 0]), vit(pixels[:, 1])
    ids = ids.clone()
    ids[:, 0] = enc_id
    e, n = "text_encoder.embeddings", T_WIDTH // 64
    x = sd[e + ".word_embeddings.weight"][ids] + sd[e + ".position_embeddings.weight"][: ids.shape[1]]
    x = ln(x, e + ".LayerNorm", 1e-12)
    add = (1.0 - mask[:, None, None, :].float()) * -10000.0
    for i in range(LAYERS):
        t = f"text_encoder.encoder.layer.{i}"
        a = f"{t}.attention"
        ctx = attend(lin(x, a + ".self.query"), lin(x, a + ".self.key"), lin(x, a + ".self.value"), n, add)
        x = ln(lin(ctx, a + ".output.dense") + x, a + ".output.LayerNorm", 1e-12)
        c = f"{t}.crossattention"
        outs = [lin(attend(lin(x, f"{c}.self{k}.query"), lin(img, f"{c}.self{k}.key"), lin(img, f"{c}.self{k}.value"), n),
                    f"{c}.output.dense{k}") for k, img in ((0, img0), (1, img1))]
        merged = lin(torch.cat(outs, -1), c + ".output.merge_layer") if i >= MERGE_FROM else (outs[0] + outs[1]) / 2
        x = ln(merged + x, c + ".output.LayerNorm", 1e-12)
        x = ln(lin(F.gelu(lin(x, t + ".intermediate.dense")), t + ".output.dense") + x, t + ".output.LayerNorm", 1e-12)
    return lin(F.relu(lin(x[:, 0], "cls_head.0")), "cls_head.2")


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A BLIP-layout checkpoint, its import (with the Shapes tokenizer as ``--tokenizer``) and the loaded folder."""
    from upop.data.tokenizer import build_shapes_tokenizer

    root = tmp_path_factory.mktemp("import")
    tok = build_shapes_tokenizer()
    tok.save_pretrained(root / "tok")
    sd = blip_state_dict(vocab=len(tok))
    torch.save({"model": sd, "epoch": 3}, root / "nlvr.pth")
    assert main(["import", "blip-nlvr", str(root / "nlvr.pth"), "--out", str(root / "out"),
                 "--tokenizer", str(root / "tok")]) == 0
    model, processor = load_any(root / "out")
    return root, sd, model, processor


def test_every_tensor_round_trips_and_nothing_is_left_unmapped(imported):
    _, sd, model, _ = imported
    own = model.state_dict()
    names = {blip_to_upop(k): k for k in sd if k not in SKIPPED}
    assert set(names) == set(own)  # no key unmapped either way
    for name, key in names.items():
        assert torch.equal(own[name], sd[key]), key
    text = model.config.text_config
    assert (text.nlvr_merge_from, text.nlvr_enc_token_id, model.config.vision_config.image_size) == (MERGE_FROM, 8, IMAGE)


def test_imported_model_computes_blip_nlvr(imported):
    _, sd, model, processor = imported
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 2, 3, IMAGE, IMAGE, generator=g)
    enc = processor.tokenizer(["a red circle", "two blue squares left of a star", "a"], padding="longest",
                              return_tensors="pt")
    with torch.no_grad():
        ours = model(input_ids=enc["input_ids"], pixel_values=pixels, attention_mask=enc["attention_mask"]).logits
        ref = reference_logits(sd, pixels, enc["input_ids"], enc["attention_mask"], enc_id=8)
    assert ours.shape == (3, 2)
    assert ref.abs().max() > 0.1 and (ours - ref).abs().max() < 1e-4


def test_two_cross_attentions_are_two_fusion_groups(imported):
    model = imported[2]
    fusion = {g.name: g for g in upop.find_groups(model) if g.modality == "fusion"}
    prefix = "text_encoder.encoder.layer"
    assert sorted(fusion) == sorted(f"{prefix}.{i}.crossattn{k}" for i in range(LAYERS) for k in (0, 1))
    assert fusion[f"{prefix}.1.crossattn1"].consumer == f"{prefix}.1.crossattention.output.dense1"
    assert fusion[f"{prefix}.1.crossattn0"].tokens_kv == (IMAGE // PATCH) ** 2 + 1


def _rewrite(sd, edit):
    sd = dict(sd)
    edit(sd)
    return {"model": sd}


BAD = {
    "not-a-checkpoint": (lambda sd: b"this is not a pickle\n", "not a readable torch checkpoint"),
    "no-model-key": (lambda sd: {"state_dict": sd}, "no 'model' key"),
    "missing": (lambda sd: _rewrite(sd, lambda d: d.pop("text_encoder.encoder.layer.2.crossattention.self1.value.bias")),
                "text_encoder.encoder.layer.2.crossattention.self1.value.bias"),
    "missing-vision": (lambda sd: _rewrite(sd, lambda d: d.pop("visual_encoder.blocks.1.attn.proj.weight")),
                       "visual_encoder.blocks.1.attn.proj.weight"),
    "unexpected": (lambda sd: _rewrite(sd, lambda d: d.update({"itm_head.weight": torch.zeros(2, 2)})), "itm_head.weight"),
    "shape": (lambda sd: _rewrite(sd, lambda d: d.update({"cls_head.2.weight": torch.zeros(3, T_WIDTH)})),
              "cls_head.2.weight"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoint_is_one_line_exit_2(case, imported, capsys):
    root, sd = imported[0], imported[1]
    make, expected = BAD[case]
    bad = root / f"{case}.pth"
    data = make(sd)
    bad.write_bytes(data) if isinstance(data, bytes) else torch.save(data, bad)
    capsys.readouterr()
    assert main(["import", "blip-nlvr", str(bad), "--out", str(root / f"out-{case}")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("upop: error:") and len(err.splitlines()) == 1 and expected in err, err
    assert not (root / f"out-{case}" / "model.safetensors").exists()


def test_single_cross_attention_state_initialises_both_twins():
    """BLIP's NLVR load_checkpoint: a VQA / retrieval text encoder's cross-attention fills self0 and self1."""
    from upop.models.blip_nlvr import twin_cross_attention
    from upop.models.folders import make_model

    vqa, nlvr = make_model("blip-vqa"), make_model("blip-nlvr", seed=1)
    state = {k: v for k, v in vqa.state_dict().items() if k.startswith("text_encoder.")}
    result = nlvr.load_state_dict(twin_cross_attention(state), strict=False)
    assert not result.unexpected_keys
    assert all(k.startswith("vision_model.") or "merge_layer" in k or k.startswith("cls_head.") for k in result.missing_keys)
    own = nlvr.state_dict()
    for k in (0, 1):
        for part in ("self{}.value.weight", "output.dense{}.bias"):
            layer = "text_encoder.encoder.layer.1.crossattention."
            assert torch.equal(own[layer + part.format(k)], state[layer + part.format("")])


def test_plain_bert_tokenizer_gets_blips_dec_and_enc(imported):
    """--tokenizer with BERT's files only (as bert-base-uncased): [DEC] and [ENC] are added, [ENC] is the last id."""
    from transformers import BertTokenizer

    root, sd = imported[0], imported[1]
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(74 - 2 - 5)]
    (root / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(root / "vocab.txt")).save_pretrained(root / "bert")
    assert main(["import", "blip-nlvr", str(root / "nlvr.pth"), "--out", str(root / "out-bert"),
                 "--tokenizer", str(root / "bert")]) == 0
    model, processor = load_any(root / "out-bert")
    tok = processor.tokenizer
    assert len(tok) == 74 and tok.convert_tokens_to_ids("[ENC]") == 73 == model.config.text_config.nlvr_enc_token_id
    assert tok.convert_tokens_to_ids("[DEC]") == 72 == model.config.text_config.bos_token_id
