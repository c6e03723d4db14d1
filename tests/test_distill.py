"""Distillation from the dense model (``--distill``) and the scores (``--score``): the teacher is
frozen and unchanged, the term is zero for student == teacher and positive otherwise for every
task, a run with distillation resumes to the uninterrupted result, and every score gives a valid
plan within the budget."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

import upop
from upop.api import compress
from upop.checkpoint.folder import WEIGHTS_FILE
from upop.cli.main import main
from upop.config import UPopConfig
from upop.distill.distiller import Distiller, kl_logits, make_teacher
from upop.models.folders import load_any
from upop.search.mask_search import SCORES, UPopSearch
from upop.tasks import get_task

from ._families import clip_world, largest_chunk_share

# case -> (task, make-model family, extra make-model options)
CASES = {
    "clip-retrieval": ("retrieval", "clip", []),
    "blip-retrieval": ("retrieval", "blip-retrieval", []),
    "siglip-retrieval": ("retrieval", "siglip", []),
    "vqa": ("vqa", "blip-vqa", []),
    "caption": ("caption", "blip-caption", []),
    "nlvr": ("nlvr", "blip-nlvr", []),
    "classification": ("classification", "deit", ["--size", "tiny"]),
    "segmentation": ("segmentation", "segmenter", ["--size", "tiny", "--num-labels", "7"]),
}


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    """Lazily built ``{case: (model, task, one training batch)}`` from tiny Shapes data."""
    root, built = tmp_path_factory.mktemp("distill"), {}

    def get(case: str, full: bool = False):
        if case not in built:
            task_name, family, extra = CASES[case]
            folder = root / case
            n = "24" if task_name in ("classification", "segmentation") else "8"  # every class in every split
            assert main(["data", "shapes", "--task", task_name, "--out", str(folder / "data"), "--train", n,
                         "--val", "10", "--test", "10", "--image-size", "32"]) == 0
            assert main(["make-model", family, "--out", str(folder / "model"), "--image-size", "32", *extra]) == 0
            model, processor = load_any(folder / "model")
            task = get_task(task_name).configure(UPopConfig(augment="none"))
            train = task.load_splits(folder / "data", splits=("train",))["train"]
            batch = task.collator(processor)([train[i] for i in range(4)])
            built[case] = (model.eval(), task, batch, processor, train)
            get.folders[case] = folder
        return built[case] if full else built[case][:3]

    get.folders = {}  # case -> its folder (data/, model/)
    return get


@pytest.mark.parametrize("mode", ["logits", "logits+hidden"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_term_is_zero_for_the_teacher_itself_and_positive_otherwise(case, mode, batches):
    model, task, batch = batches(case)
    student = copy.deepcopy(model)
    teacher = make_teacher(model)
    distiller = Distiller(teacher, mode)
    _, same = distiller.loss(task.loss, student, student, batch)
    assert float(same.detach()) == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():  # a different student
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    _, term = distiller.loss(task.loss, student, student, batch)
    assert float(term.detach()) > 1e-6
    term.backward()
    assert all(p.grad is None for p in teacher.parameters())  # no gradients reach the teacher
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), model.state_dict().values()))
    distiller.close()


@pytest.mark.parametrize("case", sorted(CASES))
def test_evaluation_builds_no_graph(case, batches):
    """Every task evaluates with gradients off (no autograd graph kept through the test split)."""
    model, task, _, processor, _ = batches(case, full=True)
    test = task.load_splits(batches.folders[case] / "data", splits=("test",))["test"]
    grad_on: list[bool] = []
    handles = [m.register_forward_hook(lambda *_: grad_on.append(torch.is_grad_enabled())) for m in model.modules()]
    try:
        task.evaluate(model, test, processor, batch_size=4)
    finally:
        for h in handles:
            h.remove()
    assert grad_on and not any(grad_on)


def test_kl_is_zero_only_when_distributions_agree():
    t = torch.randn(5, 7)
    assert float(kl_logits(t, t)) == pytest.approx(0.0, abs=1e-7)
    assert float(kl_logits(t + 3.0, t)) == pytest.approx(0.0, abs=1e-6)  # softmax ignores a shift
    assert float(kl_logits(t.flip(1), t, temperature=2.0)) > 0
    mask = torch.tensor([True, False, False, False, False])
    other = t.clone()
    other[1:] = torch.randn(4, 7)
    assert float(kl_logits(other, t, mask=mask)) == pytest.approx(0.0, abs=1e-7)  # masked rows do not count


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return clip_world(tmp_path_factory.mktemp("distill-run"), 48, 8, 8)


CFG = dict(ratio=0.5, search_epochs=2, retrain_epochs=2, batch_size=8, lr=1e-3, checkpoint_every=2, interval=2,
           latency_time=0.02, distill="logits+hidden", distill_weight=0.5, distill_temperature=2.0)


def _compress(world, out, settings=None, **kw):
    model, processor = load_any(world / "model")
    return compress(model, "retrieval", world / "data", processor=processor, config=UPopConfig(**{**CFG, **(settings or {})}),
                    out_dir=out, progress=False, log=lambda msg: None, **kw)


def test_resume_with_distillation_equals_uninterrupted(world, tmp_path):
    ref = _compress(world, tmp_path / "ref")
    assert ref.report["settings"]["distill"] == "logits+hidden"
    assert ref.report["distill"] == {"mode": "logits+hidden", "weight": 0.5, "temperature": 2.0, "hidden_blocks": 4,
                                     "teacher_cached": False}  # block outputs need the teacher's forward
    assert "Distilled from the dense model" in (tmp_path / "ref" / "report.md").read_text()
    with pytest.raises(KeyboardInterrupt):
        _compress(world, tmp_path / "run", stop_after=5)
    _compress(world, tmp_path / "run", resume=True)
    assert upop.read_plan(tmp_path / "run" / "compressed").groups == upop.read_plan(tmp_path / "ref" / "compressed").groups
    a = load_file(str(tmp_path / "ref" / "compressed" / WEIGHTS_FILE))
    b = load_file(str(tmp_path / "run" / "compressed" / WEIGHTS_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_distillation_changes_the_run_and_leaves_the_teacher_as_the_dense_model(world, tmp_path, monkeypatch):
    from upop.engine import run as train

    seen = {}
    original = train.Run._teacher

    def spy(self, model):
        dense = {k: v.clone() for k, v in model.state_dict().items()}
        teacher, distiller = original(self, model)
        seen["teacher"], seen["dense"] = teacher, dense
        return teacher, distiller

    monkeypatch.setattr(train.Run, "_teacher", spy)
    with_kd = _compress(world, tmp_path / "kd")
    teacher = seen["teacher"]
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in seen["dense"].items())
    model, processor = load_any(world / "model")
    plain = compress(model, "retrieval", world / "data", processor=processor,
                     config=UPopConfig(**{**CFG, "distill": "none"}), out_dir=tmp_path / "plain", progress=False,
                     log=lambda msg: None)
    a, b = with_kd.model.state_dict(), plain.model.state_dict()
    assert any(a[k].shape != b[k].shape or not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("score", SCORES)
def test_every_score_gives_a_valid_plan_within_the_budget(score, world, tmp_path):
    model, processor = load_any(world / "model")
    result = compress(model, "retrieval", world / "data", processor=processor,
                      config=UPopConfig(**{**CFG, "distill": "none", "retrain_epochs": 0, "score": score}),
                      out_dir=tmp_path / score, progress=False, log=lambda msg: None)
    plan = result.plan
    assert plan.search["score" if score != "gradient" else "ratio"] == (score if score != "gradient" else 0.5)
    assert all(1 <= len(g.kept) <= g.dense_units for g in plan.groups.values())
    report = result.report
    assert 0.5 <= report["achieved_ratio"] < 0.5 + largest_chunk_share(world / "model", report)


def test_scores_rank_by_importance():
    """Gradient: the largest accumulated gradient is pruned first; Taylor and Fisher: the least
    important (smallest |g x m|, smallest g^2) first."""
    model = upop.models.folders.make_model("clip")
    masks = upop.attach_masks(model)
    order = {}
    for score in SCORES:
        search = UPopSearch(masks, 0.3, total_steps=4, interval=2, score=score)
        for g in masks.groups:
            masks.grad_sum[g.name].zero_()
        first = masks.groups[0]
        grads = torch.linspace(-1.0, 2.0, first.num_units, dtype=torch.float64)
        masks[first.name].grad = grads.to(masks[first.name].dtype)
        for g in masks.groups[1:]:
            masks[g.name].grad = torch.full_like(masks[g.name], 0.5)
        search.step(0)
        s = search.scores()[: first.num_units]
        order[score] = int(torch.argmax(s))
    assert order["gradient"] == first.num_units - 1  # the most positive gradient
    grads = torch.linspace(-1.0, 2.0, first.num_units)
    assert order["taylor"] == order["fisher"] == int(torch.argmin(grads.abs()))  # the smallest magnitude
    masks.remove()


@pytest.mark.parametrize("case", ["clip-retrieval", "siglip-retrieval", "blip-retrieval"])
def test_teacher_replay_is_the_teachers_forward(case, batches):
    """``distill_cache``: the similarity matrix made from embeddings computed once equals the one
    the teacher's forward exposes for the batch (CLIP, SigLIP: logits_per_text; BLIP: the ITC
    matrix), and so does the distillation term."""
    from upop.distill.distiller import _record

    model, task, batch, processor, train = batches(case, full=True)
    teacher = make_teacher(model)
    replay = task.teacher_replay(teacher, train, processor, batch_size=3)()
    with torch.no_grad(), _record() as exposed:
        task.loss(teacher, batch)
    torch.testing.assert_close(replay(batch)["affinity"], exposed["affinity"][0], atol=1e-5, rtol=1e-5)
    student = copy.deepcopy(model)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    forward, cached = Distiller(teacher, "logits"), Distiller(teacher, "logits")
    cached.replay_factory = lambda: replay
    _, with_forward = forward.loss(task.loss, student, student, batch)
    _, with_cache = cached.loss(task.loss, student, student, batch)
    assert cached.describe()["teacher_cached"] and not forward.describe()["teacher_cached"]
    assert cached.teacher_released and not forward.teacher_released  # the cache replaced the teacher's copy
    torch.testing.assert_close(with_cache, with_forward, atol=1e-5, rtol=1e-4)


def test_teacher_table_beyond_the_limit_keeps_the_teachers_forward(batches, monkeypatch):
    """A retrieval set whose teacher table would pass CACHE_LIMIT_BYTES is not cached: the builder
    gives None and the distiller keeps its teacher and runs it (the same term as without a cache)."""
    import upop.tasks._teacher_replay as R

    model, task, batch, processor, train = batches("clip-retrieval", full=True)
    teacher = make_teacher(model)
    monkeypatch.setattr(R, "CACHE_LIMIT_BYTES", 1)
    student = copy.deepcopy(model)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    plain, limited = Distiller(teacher, "logits"), Distiller(teacher, "logits")
    limited.replay_factory = task.teacher_replay(teacher, train, processor, batch_size=3)
    _, with_forward = plain.loss(task.loss, student, student, batch)
    _, term = limited.loss(task.loss, student, student, batch)
    assert not limited.describe()["teacher_cached"] and not limited.teacher_released
    torch.testing.assert_close(term, with_forward)


def test_cached_teacher_run_resumes_to_the_uninterrupted_result(world, tmp_path):
    logits = {"distill": "logits"}
    ref = _compress(world, tmp_path / "ref", logits)
    assert ref.report["distill"]["teacher_cached"] is True
    with pytest.raises(KeyboardInterrupt):
        _compress(world, tmp_path / "run", logits, stop_after=5)
    _compress(world, tmp_path / "run", logits, resume=True)
    a = load_file(str(tmp_path / "ref" / "compressed" / WEIGHTS_FILE))
    b = load_file(str(tmp_path / "run" / "compressed" / WEIGHTS_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    off = _compress(world, tmp_path / "off", {**logits, "distill_cache": False})
    assert off.report["distill"]["teacher_cached"] is False
    assert off.report["compressed"]["metrics"]["r_mean"] == pytest.approx(ref.report["compressed"]["metrics"]["r_mean"],
                                                                          abs=2.0)


def test_distillation_settings_count_on_resume_only_when_distilling():
    """A run without distillation resumes whatever its distillation settings were (e.g. a run started
    before distill_weight's default became 4); with distillation they must match."""
    from upop.engine.resume import differences

    def fp(**settings):
        return {"task": "retrieval", "settings": {"ratio": 0.5, **settings}}

    old = fp(distill="none", distill_weight=1.0, distill_temperature=1.0, teacher_precision="fp32")
    assert differences(old, fp(distill="none", distill_weight=4.0, distill_temperature=2.0,
                               teacher_precision="bf16")) == []
    assert differences(fp(distill="logits", distill_weight=1.0), fp(distill="logits", distill_weight=4.0)) == \
        ["distill_weight (1.0 -> 4.0)"]
    assert "distill ('none' -> 'logits')" in differences(old, fp(distill="logits", distill_weight=1.0))
    assert differences(fp(distill="none"), fp(distill="none", ratio=0.75)) == ["ratio (0.5 -> 0.75)"]


@pytest.mark.parametrize("task, cache, expected", [
    ("retrieval", True, "logits"), ("retrieval", False, "none"), ("classification", True, "none"),
    ("vqa", True, "none"), ("caption", True, "none"), ("nlvr", True, "none"), ("segmentation", True, "none"),
    ("distill", True, "none"), (None, True, "none")])
def test_auto_is_logits_only_where_the_teacher_is_cached(task, cache, expected):
    from upop.distill.distiller import resolve
    from upop.tasks.registry import cached_tasks

    assert resolve("auto", task, cache) == expected
    for mode in ("none", "logits", "logits+hidden"):
        assert resolve(mode, task, cache) == mode
    if task is not None:  # the cached tasks are exactly those that can replay the teacher
        from upop.tasks.base import Task

        assert (task in cached_tasks()) == (type(get_task(task)).teacher_replay is not Task.teacher_replay)


def test_auto_distils_retrieval_from_the_cache_and_equals_explicit_logits(world, tmp_path):
    """The default ``distill="auto"`` on retrieval is ``logits`` with the cached teacher (the same
    weights bitwise as asking for it), says so in the report, and resumes like it; with the cache
    off or a table too large for the limit it distils nothing (and equals ``none``)."""
    import upop.tasks._teacher_replay as R

    auto = _compress(world, tmp_path / "auto", {"distill": "auto", "distill_weight": 4.0, "distill_temperature": 1.0})
    assert UPopConfig().distill == "auto"
    info = auto.report["distill"]
    assert info["mode"] == "logits" and info["teacher_cached"] is True and info["setting"] == "auto"
    assert "--distill auto: retrieval with the cached teacher" in (tmp_path / "auto" / "report.md").read_text()
    explicit = _compress(world, tmp_path / "logits", {"distill": "logits", "distill_weight": 4.0,
                                                      "distill_temperature": 1.0})
    a = load_file(str(tmp_path / "auto" / "compressed" / WEIGHTS_FILE))
    b = load_file(str(tmp_path / "logits" / "compressed" / WEIGHTS_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    none = _compress(world, tmp_path / "none", {"distill": "none"})
    off = _compress(world, tmp_path / "off", {"distill": "auto", "distill_cache": False})
    assert off.report["distill"] == {"mode": "none", "setting": "auto", "why": "off: --distill-cache false"}
    R_limit = R.CACHE_LIMIT_BYTES
    try:
        R.CACHE_LIMIT_BYTES = 1
        big = _compress(world, tmp_path / "big", {"distill": "auto"})
    finally:
        R.CACHE_LIMIT_BYTES = R_limit
    assert big.report["distill"]["mode"] == "none" and "cannot be cached" in big.report["distill"]["why"]
    ref = load_file(str(tmp_path / "none" / "compressed" / WEIGHTS_FILE))
    for run in ("off", "big"):
        c = load_file(str(tmp_path / run / "compressed" / WEIGHTS_FILE))
        assert c.keys() == ref.keys() and all(torch.equal(c[k], ref[k]) for k in ref)


def test_auto_counts_on_resume_as_the_mode_it_stands_for():
    """A run started with ``distill="none"`` (the default before ``auto``) resumes under ``auto``
    where auto distils nothing; where it distils, the refusal says how to resume."""
    from upop.errors import ConfigError
    from upop.engine.resume import check_same_run, differences

    def fp(task, **settings):
        return {"task": task, "settings": {"ratio": 0.5, "distill_cache": True, **settings}}

    assert differences(fp("classification", distill="none"), fp("classification", distill="auto")) == []
    assert differences(fp("retrieval", distill="logits"), fp("retrieval", distill="auto")) == []
    assert differences(fp("retrieval", distill="none"), fp("retrieval", distill="auto", distill_cache=False)) == []
    with pytest.raises(ConfigError, match=r"distill \('none' -> 'logits'\).*pass --distill none to resume it"):
        check_same_run(fp("retrieval", distill="none"), fp("retrieval", distill="auto"), "runs/x")
