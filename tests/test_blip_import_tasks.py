"""``upop import blip-retrieval|blip-vqa|blip-caption``: tiny checkpoints in salesforce/BLIP's key
layouts (written from reading models/blip_retrieval.py, blip_vqa.py, blip.py, med.py, vit.py)
round-trip into the transformers classes exactly, compute what BLIP's forward computes, evaluate
through the CLI, and bad files are one-line errors (exit 2). Table-driven over the three kinds."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from upop.cli.main import main
from upop.models.folders import load_any

# tiny sizes; widths are multiples of 64 (BLIP's head width). The vision width differs from the
# text width where BLIP allows it (ViT-L with BERT-base), so cross-attention in-widths are checked.
T_WIDTH, T_MLP, V_MLP, LAYERS, PATCH, IMAGE, MAX_POS, EMBED, QUEUE = 128, 160, 224, 2, 16, 32, 40, 96, 8
V_WIDTH = {"blip-retrieval": 192, "blip-vqa": 128, "blip-caption": 192}  # VQA: HF needs vision width == text width
CLASSES = {"blip-retrieval": "BlipForImageTextRetrieval", "blip-vqa": "BlipForQuestionAnswering",
           "blip-caption": "BlipForConditionalGeneration"}
TASKS = {"blip-retrieval": "retrieval", "blip-vqa": "vqa", "blip-caption": "caption"}
KINDS = sorted(CLASSES)


def ln(p, d):  # LayerNorm
    return {f"{p}.weight": (d,), f"{p}.bias": (d,)}


def lin(p, o, i):  # Linear(i, o)
    return {f"{p}.weight": (o, i), f"{p}.bias": (o,)}


def vit_layout(p, w):
    """models/vit.py VisionTransformer under prefix ``p``."""
    keys = {f"{p}.cls_token": (1, 1, w), f"{p}.pos_embed": (1, (IMAGE // PATCH) ** 2 + 1, w),
            f"{p}.patch_embed.proj.weight": (w, 3, PATCH, PATCH), f"{p}.patch_embed.proj.bias": (w,)}
    for i in range(LAYERS):
        b = f"{p}.blocks.{i}"
        keys |= ln(f"{b}.norm1", w) | lin(f"{b}.attn.qkv", 3 * w, w) | lin(f"{b}.attn.proj", w, w)
        keys |= ln(f"{b}.norm2", w) | lin(f"{b}.mlp.fc1", V_MLP, w) | lin(f"{b}.mlp.fc2", w, V_MLP)
    return keys | ln(f"{p}.norm", w)


def bert_layout(p, cross_width, vocab):
    """models/med.py BertModel(add_pooling_layer=False) with cross-attention into ``cross_width``-wide states."""
    h = T_WIDTH
    keys = {f"{p}.embeddings.word_embeddings.weight": (vocab, h), f"{p}.embeddings.position_embeddings.weight": (MAX_POS, h)}
    keys |= ln(f"{p}.embeddings.LayerNorm", h)
    for i in range(LAYERS):
        t = f"{p}.encoder.layer.{i}"
        for att, width in (("attention", h), ("crossattention", cross_width)):
            keys |= lin(f"{t}.{att}.self.query", h, h) | lin(f"{t}.{att}.self.key", h, width)
            keys |= lin(f"{t}.{att}.self.value", h, width) | lin(f"{t}.{att}.output.dense", h, h)
            keys |= ln(f"{t}.{att}.output.LayerNorm", h)
        keys |= lin(f"{t}.intermediate.dense", T_MLP, h) | lin(f"{t}.output.dense", h, T_MLP) | ln(f"{t}.output.LayerNorm", h)
    return keys


def lm_layout(p, vocab):
    """models/med.py BertLMHeadModel's ``cls`` (BertOnlyMLMHead) under ``p``."""
    h = T_WIDTH
    return ({f"{p}.cls.predictions.bias": (vocab,), f"{p}.cls.predictions.decoder.weight": (vocab, h),
             f"{p}.cls.predictions.decoder.bias": (vocab,)}
            | lin(f"{p}.cls.predictions.transform.dense", h, h) | ln(f"{p}.cls.predictions.transform.LayerNorm", h))


def blip_layout(kind, vocab):
    """Key -> shape of BLIP_Retrieval / BLIP_VQA / BLIP_Decoder's state dict (weights only)."""
    w = V_WIDTH[kind]
    keys = vit_layout("visual_encoder", w)
    if kind == "blip-retrieval":
        for m in ("", "_m"):  # the model, then its momentum copy
            keys |= vit_layout(f"visual_encoder{m}", w) | bert_layout(f"text_encoder{m}", w, vocab)
            keys |= lin(f"vision_proj{m}", EMBED, w) | lin(f"text_proj{m}", EMBED, T_WIDTH)
        return keys | lin("itm_head", 2, T_WIDTH)
    if kind == "blip-vqa":
        keys |= bert_layout("text_encoder", w, vocab)
    cross = T_WIDTH if kind == "blip-vqa" else w  # the VQA decoder attends to the question states
    return keys | bert_layout("text_decoder.bert", cross, vocab) | lm_layout("text_decoder", vocab)


def blip_state_dict(kind, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=g) * 0.2 for k, s in blip_layout(kind, vocab).items()}
    for p in ("text_encoder", "text_encoder_m", "text_decoder.bert"):
        if f"{p}.embeddings.word_embeddings.weight" in sd:
            sd[f"{p}.embeddings.position_ids"] = torch.arange(MAX_POS).unsqueeze(0)
    if "text_decoder.cls.predictions.bias" in sd:  # BLIP's tied LM head: the same tensors under two names
        sd["text_decoder.cls.predictions.decoder.weight"] = sd["text_decoder.bert.embeddings.word_embeddings.weight"]
        sd["text_decoder.cls.predictions.decoder.bias"] = sd["text_decoder.cls.predictions.bias"]
    if kind == "blip-retrieval":
        sd |= {"image_queue": F.normalize(torch.randn(EMBED, QUEUE, generator=g), dim=0),
               "text_queue": F.normalize(torch.randn(EMBED, QUEUE, generator=g), dim=0),
               "idx_queue": torch.full((1, QUEUE), -100), "ptr_queue": torch.zeros(1, dtype=torch.long),
               "temp": torch.tensor(0.05)}
    return sd


def hf_name(key):
    """The transformers name of a BLIP key (None: a key the import leaves out), written independently."""
    if key.endswith("position_ids") or key.split(".")[0] in {"visual_encoder_m", "text_encoder_m", "vision_proj_m",
                                                               "text_proj_m", "image_queue", "text_queue", "idx_queue",
                                                               "ptr_queue", "temp"}:
        return None
    if not key.startswith("visual_encoder."):
        return key
    for old, new in (("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
                     ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
                     ("visual_encoder.patch_embed.proj", "vision_model.embeddings.patch_embedding"),
                     ("visual_encoder.norm.", "vision_model.post_layernorm."),
                     ("visual_encoder.blocks", "vision_model.encoder.layers"), (".norm1.", ".layer_norm1."),
                     (".norm2.", ".layer_norm2."), (".attn.qkv.", ".self_attn.qkv."), (".attn.proj.", ".self_attn.projection.")):
        key = key.replace(old, new)
    return key


class Blip:
    """BLIP's forward, written from its code with plain tensor ops on BLIP's key names."""

    def __init__(self, sd):
        self.sd = sd

    def lin(self, x, p):
        return F.linear(x, self.sd[p + ".weight"], self.sd[p + ".bias"])

    def ln(self, x, p, eps=1e-12):
        return F.layer_norm(x, x.shape[-1:], self.sd[p + ".weight"], self.sd[p + ".bias"], eps)

    @staticmethod
    def attend(q, k, v, add=None):
        heads = lambda x: x.view(*x.shape[:2], x.shape[-1] // 64, 64).transpose(1, 2)  # noqa: E731
        q, k, v = heads(q), heads(k), heads(v)
        s = q @ k.transpose(-1, -2) / math.sqrt(64) + (0 if add is None else add)
        return (s.softmax(-1) @ v).transpose(1, 2).flatten(2)

    def vit(self, img):
        p = "visual_encoder"
        x = F.conv2d(img, self.sd[p + ".patch_embed.proj.weight"], self.sd[p + ".patch_embed.proj.bias"], stride=PATCH)
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.sd[p + ".cls_token"].expand(len(img), -1, -1), x], 1) + self.sd[p + ".pos_embed"]
        for i in range(LAYERS):
            b = f"{p}.blocks.{i}"
            y = self.lin(self.ln(x, b + ".norm1", 1e-6), b + ".attn.qkv")
            x = x + self.lin(self.attend(*y.view(*y.shape[:2], 3, -1).unbind(2)), b + ".attn.proj")
            x = x + self.lin(F.gelu(self.lin(self.ln(x, b + ".norm2", 1e-6), b + ".mlp.fc1")), b + ".mlp.fc2")
        return self.ln(x, p + ".norm", 1e-6)

    def bert(self, p, ids, enc=None, causal=False):
        """med.py BertModel: mode 'text' without ``enc``, 'multimodal' with; causal as a decoder."""
        e = p + ".embeddings"
        x = self.ln(self.sd[e + ".word_embeddings.weight"][ids] + self.sd[e + ".position_embeddings.weight"][: ids.shape[1]],
                    e + ".LayerNorm")
        n = ids.shape[1]
        add = torch.full((n, n), -10000.0).triu(1) if causal else None
        for i in range(LAYERS):
            t = f"{p}.encoder.layer.{i}"
            for att, kv, mask in (("attention", None, add), ("crossattention", enc, None)):
                if att == "crossattention" and enc is None:
                    continue
                a, src = f"{t}.{att}", x if kv is None else kv
                ctx = self.attend(self.lin(x, a + ".self.query"), self.lin(src, a + ".self.key"),
                                  self.lin(src, a + ".self.value"), mask)
                x = self.ln(self.lin(ctx, a + ".output.dense") + x, a + ".output.LayerNorm")
            x = self.ln(self.lin(F.gelu(self.lin(x, t + ".intermediate.dense")), t + ".output.dense") + x,
                        t + ".output.LayerNorm")
        return x

    def lm(self, p, x):
        c = p + ".cls.predictions"
        x = self.ln(F.gelu(self.lin(x, c + ".transform.dense")), c + ".transform.LayerNorm")
        return F.linear(x, self.sd[c + ".decoder.weight"], self.sd[c + ".bias"])


def outputs(kind, model, sd, ids, pixels):
    """(ours, BLIP's) outputs of the kind's forward: ITM logits and ITC similarities; the VQA decoder's
    logits on the question states; the caption decoder's logits."""
    ref = Blip(sd)
    with torch.no_grad():
        image = ref.vit(pixels)
        if kind == "blip-retrieval":
            ours = [model(input_ids=ids, pixel_values=pixels, use_itm_head=flag).itm_score for flag in (True, False)]
            itm = ref.lin(ref.bert("text_encoder", ids, enc=image)[:, 0], "itm_head")
            image_feat = F.normalize(ref.lin(image[:, 0], "vision_proj"), dim=-1)
            text_feat = F.normalize(ref.lin(ref.bert("text_encoder", ids)[:, 0], "text_proj"), dim=-1)
            return ours, [itm, image_feat @ text_feat.T]
        if kind == "blip-vqa":
            states = model.vision_model(pixel_values=pixels).last_hidden_state
            question = model.text_encoder(input_ids=ids, encoder_hidden_states=states).last_hidden_state
            answer = ids[:, :4]
            ours = [question, model.text_decoder(input_ids=answer, encoder_hidden_states=question).logits]
            q_ref = ref.bert("text_encoder", ids, enc=image)
            return ours, [q_ref, ref.lm("text_decoder", ref.bert("text_decoder.bert", answer, enc=q_ref, causal=True))]
        ours = [model(input_ids=ids, pixel_values=pixels).logits]
        return ours, [ref.lm("text_decoder", ref.bert("text_decoder.bert", ids, enc=image, causal=True))]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Lazily: kind -> (root, BLIP state dict, loaded model, processor), imported through the CLI
    with the Shapes tokenizer as ``--tokenizer``."""
    from upop.data.tokenizer import build_shapes_tokenizer

    root, done = tmp_path_factory.mktemp("import"), {}
    tok = build_shapes_tokenizer()
    tok.save_pretrained(root / "tok")

    def get(kind):
        if kind not in done:
            sd = blip_state_dict(kind, vocab=len(tok))
            torch.save({"model": sd, "epoch": 5, "config": {"k_test": 256}}, root / f"{kind}.pth")
            assert main(["import", kind, str(root / f"{kind}.pth"), "--out", str(root / kind),
                         "--tokenizer", str(root / "tok")]) == 0
            done[kind] = (root, sd, *load_any(root / kind))
        return done[kind]

    return get


@pytest.mark.parametrize("kind", KINDS)
def test_every_tensor_round_trips_and_nothing_is_left_unmapped(kind, imported):
    from upop.models.importers_blip import blip_to_hf, is_skipped

    _, sd, model, _ = imported(kind)
    assert type(model).__name__ == CLASSES[kind]
    own = model.state_dict()
    expected = {hf_name(k): k for k in sd if hf_name(k) is not None}
    assert set(expected) == set(own)  # nothing unmapped either way
    for name, key in expected.items():
        assert torch.equal(own[name], sd[key]), key
        assert blip_to_hf(kind, key) == name
    assert {k for k in sd if is_skipped(kind, k)} == {k for k in sd if hf_name(k) is None}
    v, t = model.config.vision_config, model.config.text_config
    assert (v.hidden_size, v.num_attention_heads, v.image_size, v.patch_size, v.layer_norm_eps) == (
        V_WIDTH[kind], V_WIDTH[kind] // 64, IMAGE, PATCH, 1e-6)
    assert (t.hidden_size, t.num_hidden_layers, t.max_position_embeddings, t.encoder_hidden_size) == (
        T_WIDTH, LAYERS, MAX_POS, V_WIDTH[kind])
    # the Shapes tokenizer's [DEC] and [SEP] (BLIP: 30522 and 102)
    assert (t.bos_token_id, t.sep_token_id, t.eos_token_id, t.pad_token_id, t.enc_token_id) == (7, 5, 5, 0, 8)
    assert t.label_smoothing == (0.0 if kind == "blip-retrieval" else 0.1)  # BLIP's decoder loss: 0.1
    if kind == "blip-retrieval":
        assert model.config.image_text_hidden_size == EMBED


def test_tied_keys_are_transformers_tied_keys():
    import transformers

    from upop.models.importers_blip import TIED

    for cls in ("BlipForQuestionAnswering", "BlipForConditionalGeneration"):
        assert dict(TIED) == dict(getattr(transformers, cls)._tied_weights_keys)


@pytest.mark.parametrize("kind", KINDS)
def test_imported_model_computes_blips_forward(kind, imported):
    _, sd, model, processor = imported(kind)
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 3, IMAGE, IMAGE, generator=g)
    ids = processor.tokenizer(["a red circle above a blue square", "two green stars", "one big yellow triangle"],
                              padding="longest", return_tensors="pt")["input_ids"][:, :5]
    ours, ref = outputs(kind, model, sd, ids, pixels)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape and b.abs().max() > 0.01 and (a - b).abs().max() < 1e-4, (a - b).abs().max()


@pytest.mark.parametrize("kind", KINDS)
def test_imported_folder_evaluates_through_the_cli(kind, imported, tmp_path, capsys):
    root = imported(kind)[0]
    task = TASKS[kind]
    assert main(["data", "shapes", "--task", task, "--out", str(tmp_path / "data"), "--train", "2", "--val", "2",
                 "--test", "2", "--image-size", str(IMAGE)]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", str(root / kind), "--task", task, "--data", str(tmp_path / "data")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    main_metric = {"retrieval": "r_mean", "vqa": "vqa_acc", "caption": "cider"}[task]
    assert math.isfinite(metrics[main_metric]), metrics


class _Touch:
    """Pickled as a call that would create a file: the weights-only loader must refuse to run it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (str(self.path),))


def _edited(sd, **changes):
    """``{"model": sd}`` with ``changes`` (a None value drops the key)."""
    sd = dict(sd) | changes
    return {"model": {k: v for k, v in sd.items() if v is not None}}


# per kind: a key to drop, a key to give another shape, a key no model of the kind has
MISSING = {"blip-retrieval": "itm_head.bias", "blip-vqa": "text_decoder.cls.predictions.transform.dense.weight",
           "blip-caption": "text_decoder.bert.encoder.layer.1.crossattention.self.key.weight"}
SHAPE = {"blip-retrieval": "itm_head.weight", "blip-vqa": "text_encoder.encoder.layer.0.crossattention.self.value.bias",
         "blip-caption": "visual_encoder.blocks.1.mlp.fc2.weight"}
FOREIGN = {"blip-retrieval": "text_encoder.pooler.dense.weight", "blip-vqa": "text_encoder.pooler.dense.weight",
           "blip-caption": "text_decoder.bert.pooler.dense.weight"}
QKV, NORM = "visual_encoder.blocks.0.attn.qkv.bias", "visual_encoder.norm.bias"
# case -> (kind, BLIP state dict, folder) -> (file content, text the one-line error must hold)
BAD = {
    "not-a-checkpoint": lambda kind, sd, root: (b"this is not a pickle\n", "not a readable torch checkpoint"),
    "not-a-dict": lambda kind, sd, root: ([sd], "has no 'model' key"),
    "pickle-with-code": lambda kind, sd, root: ({"model": sd, "args": _Touch(root / "pwned")},
                                                "not a readable torch checkpoint"),
    "missing": lambda kind, sd, root: (_edited(sd, **{MISSING[kind]: None}), MISSING[kind]),
    "missing-vision": lambda kind, sd, root: (_edited(sd, **{QKV: None}), QKV),
    "shape": lambda kind, sd, root: (_edited(sd, **{SHAPE[kind]: torch.zeros(3, *sd[SHAPE[kind]].shape[1:])}), SHAPE[kind]),
    "unexpected": lambda kind, sd, root: (_edited(sd, **{FOREIGN[kind]: torch.zeros(2, 2)}), FOREIGN[kind]),
    "integer-weights": lambda kind, sd, root: (_edited(sd, **{NORM: torch.zeros(sd[NORM].shape, dtype=torch.long)}), NORM),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("kind", KINDS)
def test_bad_checkpoint_is_one_line_exit_2(kind, case, imported, capsys):
    root, sd = imported(kind)[:2]
    data, expected = BAD[case](kind, sd, root)
    bad = root / f"{kind}-{case}.pth"
    bad.write_bytes(data) if isinstance(data, bytes) else torch.save(data, bad)
    capsys.readouterr()
    assert main(["import", kind, str(bad), "--out", str(root / f"out-{kind}-{case}")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("upop: error:") and len(err.splitlines()) == 1 and expected in err, err
    assert not (root / f"out-{kind}-{case}" / "model.safetensors").exists()
    assert not (root / "pwned").exists()


@pytest.mark.parametrize("kind", ["blip-vqa", "blip-caption"])
def test_tied_lm_head(kind, imported, capsys):
    """BLIP ties the LM head to the word embeddings: unequal copies are refused, a missing copy is filled."""
    root, sd = imported(kind)[:2]
    untied = dict(sd, **{"text_decoder.cls.predictions.decoder.weight": sd["text_decoder.cls.predictions.decoder.weight"] + 1})
    torch.save({"model": untied}, root / f"{kind}-untied.pth")
    capsys.readouterr()
    assert main(["import", kind, str(root / f"{kind}-untied.pth"), "--out", str(root / f"{kind}-untied")]) == 2
    err = capsys.readouterr().err
    assert "text_decoder.cls.predictions.decoder.weight" in err and "tie" in err and len(err.strip().splitlines()) == 1
    one = {k: v for k, v in sd.items() if k != "text_decoder.cls.predictions.decoder.bias"}
    torch.save({"model": one}, root / f"{kind}-one.pth")
    assert main(["import", kind, str(root / f"{kind}-one.pth"), "--out", str(root / f"{kind}-one")]) == 0
    model, _ = load_any(root / f"{kind}-one")
    assert torch.equal(model.text_decoder.cls.predictions.decoder.bias, sd["text_decoder.cls.predictions.bias"])


@pytest.mark.parametrize("kind,other", [("blip-retrieval", "blip-caption"), ("blip-caption", "blip-vqa"),
                                        ("blip-vqa", "blip-retrieval")])
def test_wrong_kind_names_the_right_one(kind, other, imported, capsys):
    root = imported(kind)[0]
    capsys.readouterr()
    assert main(["import", other, str(root / f"{kind}.pth"), "--out", str(root / f"wrong-{other}")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"looks like a {kind} checkpoint" in err and f"upop import {kind}" in err, err


def test_vqa_with_unequal_widths_is_refused(tmp_path, capsys):
    """HF's BlipForQuestionAnswering decodes over vision-width states: a BLIP VQA with another text width can't load."""
    layout = (vit_layout("visual_encoder", 192) | bert_layout("text_encoder", 192, 40)
              | bert_layout("text_decoder.bert", T_WIDTH, 40) | lm_layout("text_decoder", 40))
    torch.save({"model": {k: torch.zeros(s) for k, s in layout.items()}}, tmp_path / "vqa.pth")
    assert main(["import", "blip-vqa", str(tmp_path / "vqa.pth"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has shape" in err, err
    assert "'text_decoder.bert.encoder.layer.0.crossattention.self.key.weight'" in err, err


@pytest.mark.parametrize("kind", KINDS)
def test_config_without_tokenizer_uses_blips_ids(kind):
    """At BLIP's vocabulary (BERT's 30522 + [DEC], [ENC]) the ids default to BLIP's tokenizer's; shapes only."""
    from upop.models.importers_blip import blip_task_config, guess_kind

    sd = {k: torch.empty(s, device="meta") for k, s in blip_layout(kind, 30524).items()}
    assert guess_kind(sd) == kind
    t = blip_task_config(kind, sd).text_config
    assert (t.vocab_size, t.bos_token_id, t.enc_token_id, t.sep_token_id, t.eos_token_id, t.pad_token_id) == (
        30524, 30522, 30523, 102, 102, 0)


def test_pretrain_checkpoint_is_no_task_kind(tmp_path, capsys):
    """BLIP_Pretrain (ITC, ITM and the LM decoder together) is none of the three: the first foreign key is named."""
    from upop.models.importers_blip import guess_kind

    layout = blip_layout("blip-retrieval", 40) | bert_layout("text_decoder.bert", 192, 40) | lm_layout("text_decoder", 40)
    assert guess_kind(layout) is None
    torch.save({"model": {k: torch.zeros(s) for k, s in layout.items()}}, tmp_path / "pretrain.pth")
    assert main(["import", "blip-retrieval", str(tmp_path / "pretrain.pth"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unexpected key 'text_decoder.bert." in err, err
