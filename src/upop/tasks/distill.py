"""Label-free compression (``--task distill``): the pruned model learns to agree with the dense one.

The data is unlabelled (:mod:`upop.data.unlabelled`: images and/or sentences). The teacher is
the frozen dense model (:func:`upop.distill.distiller.make_teacher`), handed over by the run through
:meth:`DistillTask.set_teacher` before the dense baseline is measured. Each training batch goes
through the student and, under ``torch.no_grad``, through the teacher; the loss is

* for every embedding the model produces, the cosine distance ``1 - cos(student, teacher)``
  averaged over the batch; the terms are averaged over the embeddings:

  - two-tower models (``CLIPModel``, ``SiglipModel``; images AND sentences): ``image_embeds``
    and ``text_embeds``;
  - image models (ViT, DeiT, DINOv2, CLIP/SigLIP vision towers; images) and text encoders (BERT
    and its heads, CLIP/SigLIP text towers; sentences): ``pooled`` (the projected embedding, else
    the pooler output, else the first token of the last hidden state, for a decoder LLM
    (``*ForCausalLM``) its last real token) and ``tokens`` (the cosine of every token of the last
    hidden state, averaged over the real tokens);
  - a text encoder loaded from a sentence-transformers folder (one with ``modules.json``, e.g.
    all-MiniLM-L6-v2): ``pooled`` is the pipeline's own sentence embedding instead, its pooling
    (mean, CLS, max...) of the last hidden state then its normalisation
    (:class:`upop.models.sentence_transformers.Pooling`), never BERT's ``pooler`` (tanh of
    [CLS]), which sentence-transformers does not use; sentences are cut at its ``max_seq_length``.
    The pooling is read from the folder the dense model was loaded from (``config._name_or_path``:
    ``from_pretrained``, ``upop compress --model``), once, by :meth:`DistillTask.check_model` or
    :meth:`DistillTask.set_teacher`; set ``task.pooling`` to choose it yourself;

* plus, for each logits output of a head (ViT/DeiT/DINOv2 classifiers, BERT heads, a decoder
  LLM's next-token logits), the KL divergence ``KL(softmax(teacher) || softmax(student))`` over its
  classes (per token for token-level heads and next-token distributions, over the positions for
  question-answering spans);
* plus, for two-tower models, the in-batch similarity structure: CLIP the KL between the
  teacher's and the student's softmax over each row of ``logits_per_image`` and of
  ``logits_per_text`` (averaged); SigLIP the KL between the teacher's and the student's sigmoid
  probabilities of every image-sentence pair.

Evaluation measures agreement with the teacher on a split, in percent (higher is better; the
dense model itself scores 100): ``cosine`` (main metric) is the mean over the embeddings above of
their mean per-sample cosine x 100 (also reported per embedding as ``cosine_<name>``);
``top1_agreement`` is, for a two-tower model, the share of the split's images whose most similar
sentence among ALL the split's sentences is the same for student and teacher, and for a model
with a head, the share of predictions (per sample, or per token) whose top-1 class is the same,
and for a sentence-transformers encoder, the share of the split's sentences whose nearest other
sentence (cosine of the pipeline's embeddings) is the same for student and teacher.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from upop.arch import model_class_info
from upop.data.unlabelled import (IMAGE_KEYS, UnlabelledCollator, check_split, default_text_length, load_unlabelled,
                                  processor_parts, write_unlabelled)
from upop.distill.distiller import kl_logits
from upop.data.user_rows import RowSchema
from upop.errors import ConfigError, TaskError, show
from upop.measure.host_sync import host_value
from upop.models.sentence_transformers import Pooling, pipeline_of
from upop.tasks._shard import collated, evaluating, map_batches, on_device, sliced
from upop.tasks.base import Task, unwrap
from upop.tasks.registry import register_task

#: logits over the positions of the sentence (question-answering spans), not over classes
POSITION_LOGITS = ("start_logits", "end_logits")
_SIMILARITY_ROWS = 1024  # images per block of the image x sentence similarity in evaluation


def kind(model: nn.Module) -> str:
    """``"paired"``, ``"vision"`` or ``"text"``: what the model reads."""
    info = model_class_info(type(unwrap(model)).__name__)
    reads = set(info.reads) if info is not None else {"text"}
    return "paired" if reads == {"image", "text"} else "vision" if reads == {"image"} else "text"


def _text_config(model: nn.Module):
    config = unwrap(model).config
    return getattr(config, "text_config", None) or config


def fixed_text_length(model: nn.Module) -> int | None:
    """SigLIP pools the last token and was trained on sentences padded to its full length: that
    length; None for the other models (padded to the longest sentence of the batch)."""
    return int(_text_config(model).max_position_embeddings) if type(unwrap(model)).__name__.startswith("Siglip") \
        else None


def _fit_length(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (pad token, masked out) or cut the sentences to :func:`fixed_text_length`, if any."""
    length = fixed_text_length(model)
    if length is None or ids.shape[1] == length:
        return ids, mask
    if ids.shape[1] > length:
        return ids[:, :length], mask[:, :length]
    pad = _text_config(model).pad_token_id or 0
    extra = length - ids.shape[1]
    return F.pad(ids, (0, extra), value=pad), F.pad(mask, (0, extra), value=0)


def model_inputs(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """The inputs ``model`` reads from a collated batch, on the model's device."""
    device = next(unwrap(model).parameters()).device
    out = {}
    if kind(model) != "text":
        out.update({k: batch[k] for k in IMAGE_KEYS if k in batch})
    if kind(model) != "vision":
        out["input_ids"], out["attention_mask"] = _fit_length(model, batch["input_ids"], batch["attention_mask"])
    return {k: v.to(device) for k, v in out.items()}


@contextlib.contextmanager
def _teacher_mode(teacher: nn.Module):
    """No gradients; a bf16 teacher runs under bf16 autocast (its inputs are fp32)."""
    p = next(teacher.parameters())
    autocast = torch.autocast(p.device.type, dtype=torch.bfloat16) if p.dtype == torch.bfloat16 \
        else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        yield


def outputs(model: nn.Module, batch: dict, pooling: Pooling | None = None) -> dict:
    """What is compared between student and teacher for ``batch``: ``embeds`` (name -> (B, D)),
    ``tokens`` ((B, L, D) and its (B, L) mask of real tokens, or None), ``logits`` (name ->
    (tensor, mask of real tokens or None)) and ``affinity`` (``logits_per_image`` or None).
    ``pooling`` (a sentence-transformers pipeline's) makes ``embeds["pooled"]`` of a text model."""
    inputs = model_inputs(model, batch)
    found = {"embeds": {}, "tokens": None, "logits": {}, "affinity": None}
    if kind(model) == "paired":
        out = model(**inputs)
        found["embeds"] = {"image": out.image_embeds, "text": out.text_embeds}
        found["affinity"] = out.logits_per_image
        return found
    out = model(**inputs, output_hidden_states=True)
    mask = inputs.get("attention_mask")
    last = getattr(out, "last_hidden_state", None)
    last = last if last is not None else out.hidden_states[-1]
    pooled = next((getattr(out, name, None) for name in ("image_embeds", "text_embeds", "pooler_output")
                   if getattr(out, name, None) is not None), None)
    if pooling is not None and kind(model) == "text":
        pooled = pooling.embed(last, mask)
    if pooled is None and mask is not None and _causal(model):  # a decoder's summary is its last real token
        pooled = last[torch.arange(last.shape[0], device=last.device),
                      (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(1)]
    found["embeds"]["pooled"] = pooled if pooled is not None else last[:, 0]
    found["tokens"] = (last, mask)
    for name, value in out.items():
        if name.endswith("logits") and torch.is_tensor(value):
            found["logits"][name] = (value, mask if value.dim() == 3 or name in POSITION_LOGITS else None)
    return found


def _causal(model: nn.Module) -> bool:
    """A decoder that reads left to right: its class declared ``causal`` in the registry
    (:class:`upop.arch.registry.ModelClass`), else (a class the registry does not declare so, or does
    not know) a config with ``is_decoder``. Its first token sees nothing else, so its sentence
    summary is the last real token."""
    inner = unwrap(model)
    info = model_class_info(type(inner).__name__)
    return (info is not None and info.causal) or bool(getattr(inner.config, "is_decoder", False))


def _position_logits(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Span logits with padding positions pushed out of the softmax."""
    return logits.float() if mask is None else logits.float().masked_fill(mask.to(logits.device) == 0, -1e4)


def _cosine(student: torch.Tensor, teacher: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Cosine over the last axis (float64 in evaluation: the dense model scores 100 exactly)."""
    return F.cosine_similarity(student.to(dtype), teacher.to(student.device, dtype), dim=-1).clamp(-1, 1)


def _token_cosine(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None,
                  dtype=torch.float32) -> torch.Tensor:
    """Per-sample mean over the real tokens of the token-wise cosine, (B,)."""
    cos = _cosine(student, teacher, dtype)
    if mask is None:
        return cos.mean(dim=1)
    m = mask.to(cos.device).float()
    return (cos * m).sum(1) / m.sum(1).clamp_min(1.0)


def _affinity_loss(model: nn.Module, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    teacher = teacher.to(student.device)
    if type(unwrap(model)).__name__.startswith("Siglip"):  # per pair: KL of Bernoulli(sigmoid)
        s, t = student.float(), teacher.float()
        p = torch.sigmoid(t)
        return (p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))).mean()
    return (kl_logits(student, teacher) + kl_logits(student.t(), teacher.t())) / 2


def _agreement(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, name: str) -> torch.Tensor:
    """Per-sample share of top-1 predictions that agree, (B,)."""
    teacher = teacher.to(student.device)
    if name in POSITION_LOGITS:
        student, teacher = _position_logits(student, mask), _position_logits(teacher, mask)
        return (student.argmax(-1) == teacher.argmax(-1)).float()
    same = (student.argmax(-1) == teacher.argmax(-1)).float()
    if same.dim() == 1:
        return same
    m = torch.ones_like(same) if mask is None else mask.to(same.device).float()
    return (same * m).sum(1) / m.sum(1).clamp_min(1.0)


class DistillTask(Task):
    name = "distill"
    main_metric = "cosine"
    #: a compressed encoder whose embeddings agree with the dense model's at a cosine under 0.90 is
    #: not a drop-in replacement (issue #28's bar for sentence embeddings): the run says so
    quality_bar = 90.0
    #: the run hands over the frozen dense model (:meth:`set_teacher`) before it evaluates or trains
    needs_teacher = True
    #: rows from Python: images and/or sentences, no labels (what the model reads is used); or
    #: Trainer-style pixel_values and/or input_ids
    row_schema = RowSchema(required=(), any_of=("image", "text"), optional=(), layout="unlabelled",
                           aliases={"image": ("img",), "text": ("sentence", "caption")},
                           trainer_any_of=("pixel_values", "input_ids"), trainer_optional=("attention_mask",))

    def __init__(self):
        self.teacher: nn.Module | None = None
        #: (image embeddings, sentence embeddings, affinity) of every training item (:meth:`cache_teacher`)
        self._cache: tuple[torch.Tensor, torch.Tensor, object] | None = None
        self._text_limit: int | None = None
        self._fixed_length: int | None = None
        #: a sentence-transformers pipeline's pooling (see the module docstring), else None
        self.pooling: Pooling | None = None
        self._pipeline_length: int | None = None  # its max_seq_length

    def configure(self, config) -> "DistillTask":
        """Refuse the run-level ``distill`` option: this task's loss already is the distillation."""
        mode = getattr(config, "distill", "none")
        if mode not in ("none", "auto"):  # auto: none for this task (upop.distill.distiller.resolve)
            raise ConfigError(f"distill={show(mode)} does not apply to task 'distill', whose loss already is "
                              "agreement with the dense teacher; leave distill at 'auto' or 'none'")
        return super().configure(config)

    def set_teacher(self, teacher: nn.Module) -> None:
        """The frozen dense model every output is compared with (:func:`upop.distill.distiller.make_teacher`)."""
        self.teacher, self._cache = teacher, None
        self._find_pooling(teacher)

    def _find_pooling(self, model: nn.Module) -> None:
        """Take the pooling of the sentence-transformers folder ``model`` was loaded from, unless one
        is set; a pipeline upop does not support (a ``Dense`` layer...) is refused in one line."""
        if self.pooling is None and kind(model) == "text":
            pipeline = pipeline_of(model)
            if pipeline is not None:
                self.pooling, self._pipeline_length = pipeline.pooling, pipeline.max_length

    @torch.no_grad()
    def cache_teacher(self, train, processor, batch_size: int = 64, accelerator=None) -> bool:
        """``distill_cache`` for a two-tower model: the teacher's ``image_embeds`` and
        ``text_embeds`` of every training item, computed once (batches of fixed composition split
        across the processes of ``accelerator``, so a resumed run builds the same table). The
        data is not augmented and the teacher is frozen, so each step's targets are the rows of
        its batch, and its similarity matrix their product (``scale * I @ T.T``, ``+ bias`` for
        SigLIP): what the teacher's forward gives up to float rounding, for one pass over the data
        instead of a teacher forward per step. Image and text models keep the forward (their
        targets include every token's state), and so does a training set whose table, counted once
        per process on the node, would pass :data:`._teacher_replay.CACHE_LIMIT_BYTES`. Returns
        whether the table was built."""
        from upop.tasks import _teacher_replay

        teacher, self._cache = self._teacher(), None
        if kind(teacher) != "paired":
            return False
        collate = self.collator(processor)
        device = next(teacher.parameters()).device

        def run(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
            batch = {k: v.to(device) for k, v in collate([train[i] for i in range(lo, hi)]).items()}
            with _teacher_mode(teacher):
                embeds = outputs(teacher, batch, self.pooling)["embeds"]
            return embeds["image"].float().cpu(), embeds["text"].float().cpu()

        with evaluating(teacher):
            width = sum(t.shape[-1] for t in run(0, 1))
            if not _teacher_replay.table_fits(len(train) * width * 4, accelerator):  # once per process on the node
                return False
            images, texts = zip(*map_batches(len(train), batch_size, run, accelerator))
        self._cache = (torch.cat(images), torch.cat(texts), _teacher_replay.clip_affinity(unwrap(teacher)))
        return True

    @property
    def teacher_cached(self) -> bool:
        """Whether the training targets come from :meth:`cache_teacher`'s table."""
        return self._cache is not None

    def _cached_targets(self, batch) -> dict:
        """The teacher's :func:`outputs` for ``batch``, from the table (see :meth:`cache_teacher`)."""
        images, texts, affinity = self._cache
        index = host_value(batch, "index")
        image, text = images[index], texts[index]
        return {"embeds": {"image": image, "text": text}, "tokens": None, "logits": {},
                "affinity": affinity(image, text).t()}

    def _teacher(self) -> nn.Module:
        if self.teacher is None:
            raise TaskError("task 'distill' compares the model with its dense teacher, and none is set (a run sets "
                            "it; from Python call task.set_teacher(upop.distill.distiller.make_teacher(dense_model)))")
        return self.teacher

    def check_model(self, model: nn.Module) -> None:
        """The model must be a supported class; its sentence length limit is noted for the collator."""
        super().check_model(model)
        if kind(model) != "vision":
            self._text_limit = int(_text_config(model).max_position_embeddings)
            self._fixed_length = fixed_text_length(model)
        self._find_pooling(model)

    def check_data(self, model: nn.Module, dataset) -> None:
        """The data must hold what the model reads (images, sentences or both); the dataset then
        yields only that."""
        if hasattr(dataset, "use"):
            k = kind(model)
            dataset.use(images=k != "text", texts=k != "vision", who=f"a {type(unwrap(model)).__name__}")

    def load_splits(self, data_dir, splits=("train", "val", "test")):
        return load_unlabelled(data_dir, splits)

    def collator(self, processor, seed: int = 0):
        tokenizer = processor_parts(processor)[1]
        limit = default_text_length(tokenizer, self._text_limit) if tokenizer is not None and self._text_limit else None
        if limit is not None and self._pipeline_length:  # a sentence-transformers pipeline's max_seq_length
            limit = min(limit, self._pipeline_length)
        return UnlabelledCollator(processor, max_length=limit)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        """Cosine distances of the embeddings + KL of the heads' logits + (two-tower) the KL of the
        in-batch similarity structure; see the module docstring."""
        teacher = self._teacher()
        student = outputs(model, batch, self.pooling)
        if self._cache is not None:
            target = self._cached_targets(batch)
        else:
            with _teacher_mode(teacher):
                target = outputs(teacher, batch, self.pooling)
        cosines = [_cosine(s, target["embeds"][n]).mean() for n, s in student["embeds"].items()]
        if student["tokens"] is not None:
            cosines.append(_token_cosine(student["tokens"][0], target["tokens"][0], student["tokens"][1]).mean())
        loss = 1 - torch.stack(cosines).mean()
        for name, (s, mask) in student["logits"].items():
            t = target["logits"][name][0].to(s.device)
            if name in POSITION_LOGITS:
                loss = loss + kl_logits(_position_logits(s, mask), _position_logits(t, mask))
            else:
                loss = loss + kl_logits(s, t, mask=mask)
        if student["affinity"] is not None:
            loss = loss + _affinity_loss(model, student["affinity"], target["affinity"])
        return loss

    @torch.no_grad()
    def evaluate(self, model, dataset, processor, batch_size: int = 64, accelerator=None):
        teacher = self._teacher()
        self.check_model(model)
        self.check_data(model, dataset)
        collate = self.collator(processor)
        if kind(model) == "paired":
            return self._evaluate_paired(model, teacher, dataset, collate, batch_size, accelerator)

        device = next(unwrap(model).parameters()).device

        def run(batch: dict):
            batch = on_device(batch, device)
            s = outputs(model, batch, self.pooling)
            with _teacher_mode(teacher):
                t = outputs(teacher, batch, self.pooling)
            rows = {f"cosine_{n}": _cosine(v, t["embeds"][n], torch.float64) for n, v in s["embeds"].items()}
            rows["cosine_tokens"] = _token_cosine(s["tokens"][0], t["tokens"][0], s["tokens"][1], torch.float64)
            if s["logits"]:
                rows["top1_agreement"] = torch.stack([_agreement(v, t["logits"][n][0], m, n)
                                                      for n, (v, m) in s["logits"].items()]).mean(0)
            if self.pooling is not None:  # the embeddings, for the nearest-neighbour agreement below
                for name, x in (("_student", s), ("_teacher", t)):
                    rows[name] = F.normalize(x["embeds"]["pooled"].double(), dim=-1)
            return {k: v.double().cpu() for k, v in rows.items()}

        with evaluating(model):
            parts = map_batches(len(dataset), batch_size, run, accelerator, load=collated(collate, dataset.__getitem__))
        rows = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        if self.pooling is not None:
            rows["top1_agreement"] = _neighbour_agreement(rows.pop("_student"), rows.pop("_teacher"))
        metrics = {k: 100.0 * float(v.mean()) for k, v in rows.items()}
        return _with_cosine(metrics)

    def _evaluate_paired(self, model, teacher, dataset, collate, batch_size, accelerator) -> dict[str, float]:
        """Image and sentence embeddings of student and teacher over the whole split; top-1
        agreement of each image's most similar sentence among all the split's sentences."""
        length = fixed_text_length(model)
        padding = "max_length" if length else "longest"

        def embed(m: nn.Module, fn: str, inputs: dict) -> torch.Tensor:
            device = next(m.parameters()).device
            with _teacher_mode(m) if m is teacher else contextlib.nullcontext():
                out = getattr(m, fn)(**on_device(inputs, device))
            return F.normalize(out.pooler_output.double(), dim=-1).cpu()

        def run_images(pixels: dict):
            return embed(model, "get_image_features", pixels), embed(teacher, "get_image_features", pixels)

        def run_texts(enc: dict):
            return embed(model, "get_text_features", enc), embed(teacher, "get_text_features", enc)

        load_images = collated(collate.encode_images, dataset.image)
        load_texts = sliced(partial(collate.encode_texts, padding=padding, max_length=length), dataset.texts)
        with evaluating(model):
            img_s, img_t = (torch.cat(x) for x in zip(*map_batches(len(dataset.images), batch_size, run_images,
                                                                   accelerator, load=load_images)))
            txt_s, txt_t = (torch.cat(x) for x in zip(*map_batches(len(dataset.texts), batch_size, run_texts,
                                                                   accelerator, load=load_texts)))
        same = torch.cat([(img_s[i:i + _SIMILARITY_ROWS] @ txt_s.t()).argmax(1)
                          == (img_t[i:i + _SIMILARITY_ROWS] @ txt_t.t()).argmax(1)
                          for i in range(0, len(img_s), _SIMILARITY_ROWS)])
        metrics = {"cosine_image": 100.0 * float((img_s * img_t).sum(-1).clamp(-1, 1).mean()),
                   "cosine_text": 100.0 * float((txt_s * txt_t).sum(-1).clamp(-1, 1).mean()),
                   "top1_agreement": 100.0 * float(same.float().mean())}
        return _with_cosine(metrics)

    def example_inputs(self, model, processor, dataset, batch_size: int = 1):
        self.check_model(model)
        self.check_data(model, dataset)
        batch = self.collator(processor)([dataset[i % len(dataset)] for i in range(batch_size)])
        return model_inputs(model, batch)

    def text_tokens(self, processor, dataset) -> int | None:
        """Sentence length the text tower sees: SigLIP's fixed length, else the padded length of
        up to 64 sentences of the data; None without sentences."""
        if self._fixed_length:
            return self._fixed_length
        texts = list(getattr(dataset, "texts", []))[:64]
        if not texts or "texts" not in getattr(dataset, "parts", ("texts",)):
            return None
        return int(self.collator(processor).encode_texts(texts)["input_ids"].shape[1])


def _neighbour_agreement(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per sentence, 1.0 when its nearest other sentence (cosine of the unit-norm (N, D)
    embeddings; itself excluded) is the same for student and teacher, (N,); with one sentence, 1.0."""
    if len(student) < 2:
        return torch.ones(len(student), dtype=torch.float64)

    def nearest(x: torch.Tensor, lo: int) -> torch.Tensor:
        sim = x[lo:lo + _SIMILARITY_ROWS] @ x.t()
        rows = torch.arange(sim.shape[0])
        sim[rows, rows + lo] = -float("inf")
        return sim.argmax(1)

    return torch.cat([(nearest(student, lo) == nearest(teacher, lo)).double()
                      for lo in range(0, len(student), _SIMILARITY_ROWS)])


def _with_cosine(metrics: dict[str, float]) -> dict[str, float]:
    """``cosine`` (the mean of the ``cosine_*`` metrics) first, then the others by name."""
    cos = [v for k, v in metrics.items() if k.startswith("cosine_")]
    return {"cosine": sum(cos) / len(cos), **dict(sorted(metrics.items()))}


register_task(
    name="distill", task=DistillTask, writer=write_unlabelled, checker=check_split,
    summary="label-free: the compressed model learns to agree with the dense one; images and/or texts.txt",
)
