"""Hub-shareable compressed folders (:mod:`upop.checkpoint.hub`): every family's compressed folder loads with
``AutoModel...from_pretrained(folder, trust_remote_code=True)`` and runs in ``pipeline(...)`` in a
process where upop cannot be imported, with the outputs of ``upop.load_compressed``; upop itself
accepts only its own ``auto_map`` and never imports ``modeling_upop.py``."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file

import upop
import upop.models.folders as M
from upop.errors import CheckpointError
from upop.checkpoint.folder import WEIGHTS_FILE, model_class
from upop.checkpoint.hub import MODELING_FILE, PREFIX, SHAPES_KEY
from upop.checkpoint.safe_load import SAFE_INDEX, SAFE_WEIGHTS, UPOP_INDEX
from upop.pruning.prune import prune

from ._families import FAMILIES
from .test_engine import _random_masks

#: this folder: the no-upop subprocess imports :mod:`tests._forwards` (torch only) from it
TESTS = Path(__file__).resolve().parent

#: the subprocess: upop blocked (a meta-path finder refuses it, its folders are off sys.path),
#: then every folder of the job list loaded through transformers only, with every Auto class its
#: config.json's auto_map names, and the outputs of each saved (the forwards of tests/_forwards.py)
CHILD = textwrap.dedent('''
    import importlib.abc, json, sys
    from pathlib import Path

    import torch

    class NoUpop(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "upop" or name.startswith("upop."):
                raise ImportError("upop is not installed here")

    sys.meta_path.insert(0, NoUpop())
    sys.path[:] = [p for p in sys.path if not (Path(p or ".") / "upop").exists()]
    try:
        import upop
    except ImportError:
        pass
    else:
        raise SystemExit("upop is importable in the no-upop process")

    import transformers
    from PIL import Image
    from safetensors.torch import save_file

    jobs = json.loads(Path(sys.argv[1]).read_text())
    sys.path.insert(0, jobs["tests"])
    from _forwards import FORWARDS  # torch only: upop stays blocked

    transformers.utils.logging.disable_progress_bar()
    import logging

    class Errors(logging.Handler):  # what transformers logs at error level (e.g. a pipeline's "not supported")
        seen = []

        def emit(self, record):
            Errors.seen.append(record.getMessage())

    transformers.utils.logging.get_logger("transformers").addHandler(Errors(logging.ERROR))
    report = {}
    for job in jobs["models"]:
        auto_map = json.loads((Path(job["folder"]) / "config.json").read_text())["auto_map"]
        entries, outputs = {}, {}
        for auto in [key for key in auto_map if key != "AutoConfig"]:  # the Auto classes the folder names
            plain = []  # without trust_remote_code: transformers' own custom-code refusal, never a model
            for extra in ({}, {"ignore_mismatched_sizes": True}):
                try:
                    getattr(transformers, auto).from_pretrained(job["folder"], **extra)
                except ValueError as exc:
                    plain.append("trust_remote_code=True" in str(exc))
                else:
                    plain.append("loaded")
            model, info = getattr(transformers, auto).from_pretrained(job["folder"], trust_remote_code=True,
                                                                      output_loading_info=True)
            problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
            with torch.no_grad():
                outs = FORWARDS[job["family"]](model.eval())
            outputs.update({f"{auto}:{i}": t.float().contiguous() for i, t in enumerate(outs)})
            entries[auto] = {"class": type(model).__name__, "problems": problems, "module": type(model).__module__,
                             "plain": plain, "outputs": len(outs)}
        save_file(outputs, job["out"])
        report[job["folder"]] = entries
        # the dense class itself (the plan's model_class, where transformers defines it), even with
        # ignore_mismatched_sizes=True: no model.safetensors there, so it raises instead of loading
        dense_name = json.loads((Path(job["folder"]) / "upop_plan.json").read_text())["model_class"]
        dense = getattr(transformers, dense_name, None)
        if dense is None:
            report[job["folder"] + ":dense"] = "not a transformers class"
        else:
            try:
                dense.from_pretrained(job["folder"], ignore_mismatched_sizes=True)
            except OSError as exc:
                report[job["folder"] + ":dense"] = "OSError: " + str(exc).splitlines()[0]
            else:
                report[job["folder"] + ":dense"] = "loaded"
    image = Image.new("RGB", (40, 40), (200, 30, 30))
    for job in jobs["pipelines"]:
        Errors.seen.clear()
        pipe = transformers.pipeline(job["task"], model=job["folder"], trust_remote_code=True)
        kwargs = {"candidate_labels": ["a red square", "a blue circle"]} if "zero-shot" in job["task"] else {}
        result = pipe(image, **kwargs)
        report[job["folder"] + ":" + job["task"]] = {"class": type(pipe.model).__name__, "result": result,
                                                     "errors": list(Errors.seen)}
    Path(jobs["report"]).write_text(json.dumps(report))
''')

NAMES = sorted(FAMILIES)
#: families saved with their processor, for the pipelines
PIPELINES = {"clip": "zero-shot-image-classification", "vit": "image-classification"}


def _outputs(family: str, model) -> list[torch.Tensor]:
    with torch.no_grad():
        return [t.float() for t in FAMILIES[family][1](model)]


def _autos(folder: Path) -> list[str]:
    """The Auto classes the folder's config.json maps to its generated model class."""
    return [key for key in json.loads((folder / "config.json").read_text())["auto_map"] if key != "AutoConfig"]


def _named_autos(model_type: str, cls: str) -> set[str]:
    """The Auto classes whose transformers name tables map the dense ``model_type`` to the class
    named ``cls``: read from transformers' tables of names, apart from upop's use of its mappings."""
    found = set()
    for name in (n for n in dir(transformers) if n.startswith("AutoModel")):
        names = getattr(getattr(getattr(transformers, name), "_model_mapping", None), "_model_mapping", {})
        mapped = names.get(model_type, ())
        if cls in ((mapped,) if isinstance(mapped, str) else mapped):
            found.add(name)
    return found


def _pruned(family: str):
    model = FAMILIES[family][0]()
    masks = upop.attach_masks(model)
    _random_masks(masks, seed=3)
    prune(model, masks)  # the function, imported by name
    return model


def _no_upop(tmp: Path, models: list[tuple[str, Path]], pipelines: list[tuple[str, Path]]) -> dict:
    """Run :data:`CHILD` on the folders; the outputs of model ``i`` land in ``tmp/out-i.safetensors``."""
    jobs = {"models": [{"family": f, "folder": str(d), "out": str(tmp / f"out-{i}.safetensors")}
                       for i, (f, d) in enumerate(models)],
            "pipelines": [{"task": PIPELINES[f], "folder": str(d)} for f, d in pipelines],
            "report": str(tmp / "report.json"), "tests": str(TESTS)}
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    (tmp / "child.py").write_text(CHILD)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp / "modules"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, str(tmp / "child.py"), str(tmp / "jobs.json")], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp / "report.json").read_text())


@pytest.fixture(scope="module")
def hub_world(tmp_path_factory):
    """Every family pruned and saved (save_compressed), then loaded by upop and saved again
    (save_pretrained); all folders loaded by transformers in one no-upop subprocess."""
    tmp = tmp_path_factory.mktemp("hub")
    want, folders = {}, []
    for family in NAMES:
        model = _pruned(family)
        processor = M.make_processor(family, 32) if family in PIPELINES else None
        upop.save_compressed(model, tmp / f"{family}-saved", processor=processor)
        loaded = upop.load_compressed(tmp / f"{family}-saved")
        loaded.save_pretrained(tmp / f"{family}-resaved")
        if processor is not None:
            processor.save_pretrained(tmp / f"{family}-resaved")
        want[family] = _outputs(family, loaded)
        folders += [(family, tmp / f"{family}-saved"), (family, tmp / f"{family}-resaved")]
        if family == "bert":  # save_pretrained in shards: the same config.json and modeling_upop.py
            loaded.save_pretrained(tmp / "bert-sharded", max_shard_size="20KB")
            assert (tmp / "bert-sharded" / UPOP_INDEX).is_file()
            assert not list((tmp / "bert-sharded").glob("model-*.safetensors"))  # shards of the variant only
            folders.append((family, tmp / "bert-sharded"))
    pipes = [(f, tmp / f"{f}-{kind}") for f in PIPELINES for kind in ("saved", "resaved")]
    report = _no_upop(tmp, folders, pipes)
    return tmp, want, folders, report


def test_every_family_loads_without_upop(hub_world):
    tmp, want, folders, report = hub_world
    for i, (family, folder) in enumerate(folders):
        cls = json.loads((folder / "upop_plan.json").read_text())["model_class"]
        autos = _autos(folder)
        assert "AutoModel" in autos and sorted(report[str(folder)]) == sorted(autos), folder  # every one loaded
        got = load_file(str(tmp / f"out-{i}.safetensors"))
        for auto in autos:
            entry = report[str(folder)][auto]
            assert entry["class"] == PREFIX + cls, (folder, auto)
            assert "upop" not in entry["module"].split(".")[0]  # transformers' copy of modeling_upop.py
            assert entry["problems"] == {}, (folder, auto, entry["problems"])  # no missing/unexpected/mismatched
            # without trust_remote_code: transformers' own refusal, also with ignore_mismatched_sizes=True
            assert entry["plain"] == [True, True], (folder, auto, entry["plain"])
            assert entry["outputs"] == len(want[family])
            for k, expected in enumerate(want[family]):
                assert torch.allclose(got[f"{auto}:{k}"], expected, atol=1e-5, rtol=1e-4), (folder, auto, k)
        # and the same folder still loads with upop, with the same outputs
        again = _outputs(family, upop.load_compressed(folder))
        assert all(torch.equal(a, b) for a, b in zip(again, want[family])), folder


def test_pipelines_without_upop(hub_world):
    _, _, _, report = hub_world
    for family, task in PIPELINES.items():
        for kind in ("saved", "resaved"):
            entry = report[f"{hub_world[0] / f'{family}-{kind}'}:{task}"]
            assert entry["class"].startswith(PREFIX)
            result = entry["result"]
            assert entry["errors"] == [], entry["errors"]  # no "model ... is not supported for ..." error
            assert isinstance(result, list) and result and all("score" in r and "label" in r for r in result)
            assert abs(sum(r["score"] for r in result) - 1.0) < 1e-4 or task == "image-classification"


def test_the_dense_class_cannot_load_a_compressed_folder(hub_world):
    """The dense class itself (the plan's model_class), even with ignore_mismatched_sizes=True,
    finds no model.safetensors (the weights are the variant model.upop.safetensors) and raises
    OSError instead of building a dense model whose pruned layers it re-initialises at random:
    without upop (the no-upop process, for the classes transformers defines) and with upop (every
    class, upop's own BlipForNLVR and Segmenter included)."""
    _, _, folders, report = hub_world
    checked = 0
    for _, folder in folders:
        name = json.loads((folder / "upop_plan.json").read_text())["model_class"]
        result = report[f"{folder}:dense"]
        if hasattr(transformers, name):
            checked += 1
            assert result.startswith("OSError") and SAFE_WEIGHTS in result, (folder, result)
        else:
            assert result == "not a transformers class", (folder, result)
        with pytest.raises(OSError, match=SAFE_WEIGHTS):
            model_class(name).from_pretrained(str(folder), ignore_mismatched_sizes=True)
    assert checked > 0


#: the line of the generated from_pretrained that reads the variant (absent in earlier versions)
VARIANT_LINE = '        kwargs.setdefault("variant", "upop")\n'


def _old_style(src: Path, dst: Path) -> Path:
    """A copy of ``src`` as an earlier upop version wrote it: the weights under the dense names
    (``model.safetensors``, or ``model-NNNNN-of-NNNNN.safetensors`` shards and their
    ``model.safetensors.index.json``) and a ``modeling_upop.py`` without the variant default."""
    dst.mkdir()
    names = {}
    for file in src.iterdir():
        name = {WEIGHTS_FILE: SAFE_WEIGHTS, UPOP_INDEX: SAFE_INDEX}.get(file.name, file.name)
        names[file.name] = "model-" + name.removeprefix("model.upop-") if name.startswith("model.upop-") else name
        (dst / names[file.name]).write_bytes(file.read_bytes())
    if (dst / SAFE_INDEX).is_file():
        index = json.loads((dst / SAFE_INDEX).read_text())
        index["weight_map"] = {k: names[v] for k, v in index["weight_map"].items()}
        (dst / SAFE_INDEX).write_text(json.dumps(index))
    source = (dst / MODELING_FILE).read_text()
    assert VARIANT_LINE in source
    (dst / MODELING_FILE).write_text(source.replace(VARIANT_LINE, ""))
    return dst


@pytest.mark.parametrize("family", NAMES)
def test_a_folder_of_an_earlier_version_still_loads(family, hub_world, tmp_path):
    """Every folder of the family (saved, resaved, sharded) rewritten as earlier upop versions
    wrote it loads with load_compressed exactly as the folder itself; a folder holding weights
    under both names is refused in one line naming both files."""
    tmp, want, folders, _ = hub_world
    for _, folder in [(f, d) for f, d in folders if f == family]:
        old = _old_style(folder, tmp_path / folder.name)
        assert not [p.name for p in old.iterdir() if ".upop" in p.name]
        assert (old / SAFE_WEIGHTS).is_file() or (old / SAFE_INDEX).is_file()
        got = _outputs(family, upop.load_compressed(old))
        assert len(got) == len(want[family]) and all(torch.equal(a, b) for a, b in zip(got, want[family])), folder
        both = tmp_path / f"{folder.name}-both"
        both.mkdir()
        for file in folder.iterdir():
            (both / file.name).write_bytes(file.read_bytes())
        (both / SAFE_WEIGHTS).write_bytes(next(old.glob("model*.safetensors")).read_bytes())
        with pytest.raises(CheckpointError) as err:
            upop.load_compressed(both)
        message = str(err.value)
        assert "\n" not in message and "ambiguous" in message and SAFE_WEIGHTS in message, message
        assert (WEIGHTS_FILE if (folder / WEIGHTS_FILE).is_file() else UPOP_INDEX) in message, message


@pytest.mark.parametrize("family", NAMES)
def test_folder_contents(family, hub_world):
    """config.json records upop's own model type (upop_<type>) with its AutoConfig, names the class,
    maps Auto classes to the generated module,
    and the generated file imports only torch, transformers and the standard library."""
    tmp = hub_world[0]
    for kind in ("saved", "resaved"):
        folder = tmp / f"{family}-{kind}"
        config = json.loads((folder / "config.json").read_text())
        cls = json.loads((folder / "upop_plan.json").read_text())["model_class"]
        assert config["architectures"] == [cls]
        assert config["model_type"].startswith("upop_") and config["auto_map"]["AutoConfig"].startswith(
            "modeling_upop.")
        card = (folder / "README.md").read_text()
        meta = yaml.safe_load(card.split("---")[1])
        assert meta["library_name"] == "transformers" and "upop" in meta["tags"], meta
        autos = _autos(folder)
        assert any(f"{auto}.from_pretrained(" in card for auto in autos), card
        assert all(config["auto_map"][auto] == f"modeling_upop.{PREFIX}{cls}" for auto in autos)
        # at least the Auto classes transformers' name tables give the dense class (AutoModel always)
        dense_type = config["model_type"].removeprefix("upop_")
        assert {"AutoModel", *_named_autos(dense_type, cls)} <= set(autos), (autos, dense_type)
        assert config[SHAPES_KEY]["version"] == 1 and config[SHAPES_KEY]["modules"]
        source = (folder / MODELING_FILE).read_text()
        tops = {n.split(".")[0] for node in ast.walk(ast.parse(source))
                for n in ([a.name for a in node.names] if isinstance(node, ast.Import)
                          else [node.module] if isinstance(node, ast.ImportFrom) else [])}
        assert tops <= {"__future__", "torch", "transformers", "math", "dataclasses"}, tops
    assert (tmp / f"{family}-saved" / MODELING_FILE).read_text() == (tmp / f"{family}-resaved" / MODELING_FILE
                                                                     ).read_text()


def test_loaded_model_config_has_no_hub_fields(hub_world):
    model = upop.load_compressed(hub_world[0] / "clip-saved")
    assert not hasattr(model.config, "auto_map") and not hasattr(model.config, SHAPES_KEY)


# --- upop accepts only its own auto_map and never imports the file ----------------------------

MARKER = "code-ran"


def _copy(src: Path, dst: Path, edit_config=None) -> Path:
    """A copy of ``src`` whose Python files (modeling_upop.py and two others an auto_map might
    name) write the marker and exit when imported."""
    dst.mkdir()
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    if edit_config is not None:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config)
        (dst / "config.json").write_text(json.dumps(config))
    evil = f"import pathlib\npathlib.Path({str(dst.parent / MARKER)!r}).write_text('ran')\nraise SystemExit(3)\n"
    for name in (MODELING_FILE, "modeling_evil.py", "modeling_other.py"):
        (dst / name).write_text(evil)
    return dst


def _set_map(mapping):
    return lambda c: c.update(auto_map=mapping)


REFUSED = {
    "module elsewhere": _set_map({"AutoModel": "modeling_evil.UPopViTForImageClassification"}),
    "other file name": _set_map({"AutoModel": "modeling_other.UPopViTForImageClassification"}),
    "other class": _set_map({"AutoModel": "modeling_upop.EvilModel"}),
    "extra key": lambda c: c["auto_map"].update(AutoTokenizer=["modeling_upop.UPopViTForImageClassification", None]),
    "AutoConfig for a transformers config": lambda c: c["auto_map"].update(AutoConfig="modeling_upop.ViTConfig"),
    "AutoConfig of another class": lambda c: c["auto_map"].update(AutoConfig="modeling_upop.UPopEvilConfig"),
    "AutoConfig of another type": lambda c: c["auto_map"].update(AutoConfig="modeling_upop.UPopBertConfig"),
    "not an object": _set_map(["modeling_upop.UPopViTForImageClassification"]),
    "no AutoModel": _set_map({"AutoModelForImageClassification": "modeling_upop.UPopViTForImageClassification"}),
    "repo-qualified": _set_map({"AutoModel": "evil/repo--modeling_upop.UPopViTForImageClassification"}),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_other_auto_maps_are_refused(case, hub_world, tmp_path):
    folder = _copy(hub_world[0] / "vit-saved", tmp_path / "c", REFUSED[case])
    with pytest.raises(CheckpointError, match="auto_map") as err:
        upop.load_compressed(folder)
    assert "\n" not in str(err.value) and "never runs code" in str(err.value)
    assert not (tmp_path / MARKER).exists()


def test_own_model_type_without_its_auto_config_is_refused(hub_world, tmp_path):
    folder = _copy(hub_world[0] / "vit-saved", tmp_path / "c", lambda c: c["auto_map"].pop("AutoConfig"))
    with pytest.raises(CheckpointError, match="model_type 'upop_vit' is not one transformers or upop defines"):
        upop.load_compressed(folder)
    assert not (tmp_path / MARKER).exists()


def test_own_auto_map_never_imports_the_file(hub_world, tmp_path):
    """upop's own auto_map is accepted and the folder loads from its plan; a modeling_upop.py that
    would write a marker and exit on import is never imported, and neither is the tokenizer's."""
    folder = _copy(hub_world[0] / "vit-saved", tmp_path / "c")
    model = upop.load_compressed(folder)
    assert type(model).__name__ == "ViTForImageClassification"
    assert all(torch.equal(a, b) for a, b in zip(_outputs("vit", model), hub_world[1]["vit"]))
    upop.load_model(folder)  # the CLI's loader: same path
    assert not (tmp_path / MARKER).exists()
    assert not [name for name in sys.modules if name.endswith("modeling_upop")]


def test_tokenizer_auto_map_still_refused(hub_world, tmp_path):
    folder = _copy(hub_world[0] / "clip-saved", tmp_path / "c")
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["modeling_upop.UPopCLIPModel", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    with pytest.raises(CheckpointError, match="tokenizer_config.json has an auto_map"):
        upop.load_compressed(folder)
    assert not (tmp_path / MARKER).exists()


def test_unsharable_model_warns_and_still_loads(tmp_path, monkeypatch):
    """A model whose classes upop cannot copy gets no Hub files (a warning), and loads with upop."""
    import upop.checkpoint.hub as hub

    def refuse(model, record):
        raise CheckpointError("cannot copy this class")

    monkeypatch.setattr(hub, "modeling_source", refuse)
    model = _pruned("vit")
    with pytest.warns(UserWarning, match="load_compressed only"):
        upop.save_compressed(model, tmp_path / "c")
    assert not (tmp_path / "c" / MODELING_FILE).exists()
    assert "auto_map" not in json.loads((tmp_path / "c" / "config.json").read_text())
    assert all(torch.equal(a, b) for a, b in zip(_outputs("vit", model),
                                                 _outputs("vit", upop.load_compressed(tmp_path / "c"))))


def test_save_pretrained_push_to_hub_uploads_every_file(tmp_path, monkeypatch):
    """save_pretrained(push_to_hub=True) pushes through push_to_hub (a fresh folder, every file
    uploaded): the plan, modeling_upop.py and the config with its auto_map; the local folder too."""
    model = _pruned("vit")
    pushed = []

    def fake_push(self, repo_id, **kwargs):  # what push_to_hub does, minus the network
        folder = tmp_path / "upload"
        self.save_pretrained(folder, max_shard_size=kwargs["max_shard_size"])
        pushed.append((repo_id, kwargs, sorted(p.name for p in folder.iterdir()),
                       json.loads((folder / "config.json").read_text())))
        return "https://huggingface.co/me/pruned-vit"

    monkeypatch.setattr(type(model), "push_to_hub", fake_push)
    url = model.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="me/pruned-vit", commit_message="hi")
    assert url == "https://huggingface.co/me/pruned-vit" and len(pushed) == 1
    repo_id, kwargs, files, config = pushed[0]
    assert repo_id == "me/pruned-vit" and kwargs["commit_message"] == "hi"
    assert {"config.json", WEIGHTS_FILE, "upop_plan.json", MODELING_FILE} <= set(files)
    assert SAFE_WEIGHTS not in files
    assert config["auto_map"]["AutoModel"] == "modeling_upop.UPopViTForImageClassification"
    assert {"config.json", WEIGHTS_FILE, "upop_plan.json", MODELING_FILE} <= {
        p.name for p in (tmp_path / "local").iterdir()}


def test_save_pretrained_writes_the_variant_only(hub_world, tmp_path):
    """save_pretrained of a pruned model over a folder of an earlier save (dense-named weights,
    single and sharded) leaves only the variant's weights, which load exactly; another variant
    is refused in one line before anything is written."""
    from upop.errors import ConfigError

    model = _pruned("vit")
    old = _old_style(hub_world[0] / "bert-sharded", tmp_path / "old")  # dense-named shards and index
    (old / SAFE_WEIGHTS).write_bytes(b"stale")
    model.save_pretrained(old)
    names = {p.name for p in old.iterdir()}
    weights = {n for n in names if n.endswith(".safetensors") or n.startswith("model.safetensors")}
    assert weights == {WEIGHTS_FILE}, names
    assert all(torch.equal(a, b) for a, b in zip(_outputs("vit", model), _outputs("vit", upop.load_compressed(old))))
    with pytest.raises(ConfigError, match="variant 'fp16' is not accepted") as err:
        model.save_pretrained(tmp_path / "fp16", variant="fp16")
    assert "\n" not in str(err.value) and not (tmp_path / "fp16").exists()


def test_shape_record_lists_only_what_pruning_changed():
    """Diffing against a dense model of the same config: a dense model records nothing; a pruned
    one only its sliced Linears and attention widths, not modes (training, gradient checkpointing)."""
    from upop.checkpoint.hub import shape_record

    dense = FAMILIES["vit"][0]()
    assert shape_record(dense)["modules"] == {}
    model = _pruned("vit")
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    assert any(vars(m).get("gradient_checkpointing") for m in model.modules())
    model.train()
    modules = shape_record(model)["modules"]
    plan = model.upop_plan.groups
    sliced = {n for g in upop.find_groups(model) if len(plan[g.name].kept) < plan[g.name].dense_units
              for n in (*g.producers, g.consumer)}
    assert sliced and set(modules) >= sliced
    assert {k for e in modules.values() for k in e.get("attrs", {})} <= {"in_features", "out_features", "head_dim"}
    for name, entry in modules.items():
        for key, shape in entry.get("tensors", {}).items():
            assert list(getattr(model.get_submodule(name), key).shape) == shape


# --- the generated class refuses weights that would leave a tensor randomly initialised ----------

MISSING_CHILD = CHILD.split("\nimport transformers\n")[0] + textwrap.dedent('''
    import transformers

    transformers.utils.logging.set_verbosity_error()
    report = {}
    for folder in sys.argv[2:]:
        try:
            transformers.AutoModel.from_pretrained(folder, trust_remote_code=True)
            report[folder] = "loaded"
        except ValueError as exc:
            report[folder] = str(exc)
    Path(sys.argv[1]).write_text(json.dumps(report))
''')


def _without(src: Path, dst: Path, keys: list[str]) -> Path:
    from safetensors.torch import save_file

    dst.mkdir()
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    state = load_file(str(dst / WEIGHTS_FILE))
    for key in keys:
        state.pop(key, None)
    save_file(state, str(dst / WEIGHTS_FILE), metadata={"format": "pt"})
    return dst


def test_generated_class_refuses_missing_tensors_without_upop(hub_world, tmp_path):
    """transformers alone (upop blocked) loading a folder whose weights lack a tied pair (BLIP's
    decoder embeddings and LM head) or one ordinary weight: the generated UPop class raises one
    ValueError naming the tensor instead of initialising it randomly; the intact folder loads."""
    tied = ["text_decoder.bert.embeddings.word_embeddings.weight", "text_decoder.cls.predictions.decoder.weight",
            "text_decoder.cls.predictions.bias"]
    cases = {
        _without(hub_world[0] / "blip-caption-saved", tmp_path / "blip", tied): "'text_decoder.",
        _without(hub_world[0] / "vit-saved", tmp_path / "vit", ["vit.embeddings.patch_embeddings.projection.weight"]):
            "'vit.embeddings.patch_embeddings.projection.weight'",
        hub_world[0] / "vit-saved": None,
    }
    (tmp_path / "child.py").write_text(MISSING_CHILD)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, str(tmp_path / "child.py"), str(tmp_path / "report.json"),
                           *map(str, cases)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    for folder, needle in cases.items():
        if needle is None:
            assert report[str(folder)] == "loaded"
        else:
            message = report[str(folder)]
            assert "\n" not in message and f"tensor {needle}" in message and "randomly initialised" in message, message
