"""No code from model folders, ever; weights and plans checked.

One table of damaged or hostile model folders (dense and compressed): each must be refused with
ONE line naming the problem, through the CLI (``upop: error: ...``, exit code 2, no traceback)
and through the API (a :class:`CheckpointError`), and no Python shipped in the folder (modules
named by an ``auto_map``, a pickle) may ever run, even with ``yes`` on stdin.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

import upop
from upop.checkpoint.folder import WEIGHTS_FILE
from upop.checkpoint.safe_load import SAFE_WEIGHTS, UPOP_INDEX
from upop.cli.main import main
from upop.pruning.prune import prune

from ._families import clip_world

KEY = "text_model.encoder.layers.0.mlp.fc1.weight"
MARKER = "code-ran"  # created (in the test's tmp folder) by any code of a hostile folder that runs
EVIL_SOURCE = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny Shapes retrieval data, a tiny CLIP folder, its compressed checkpoint, and the
    weights of a CLIP of another size."""
    root = clip_world(tmp_path_factory.mktemp("safety"), 16, 8, 8)
    model, _ = upop.load_model(root / "model")
    masks = upop.attach_masks(model)
    masks[masks.groups[0].name].data[:3] = 0
    prune(model, masks)  # the function, imported by name
    upop.save_compressed(model, root / "compressed")
    other = upop.models.folders.make_model("clip", size="small", image_size=32)
    save_file(other.state_dict(), str(root / "other-size.safetensors"), metadata={"format": "pt"})
    return root


class _Pickled:
    """Unpickling this creates the marker file: what a hostile pytorch_model.bin can do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


# ---- edits of a copied folder ------------------------------------------------------------------

Edit = Callable[[Path, Path], None]  # (copied folder, world folder) -> None


def _weights(folder: Path) -> Path:
    """The weights file of a dense (``model.safetensors``) or compressed (``model.upop.safetensors``) folder."""
    return folder / (WEIGHTS_FILE if (folder / WEIGHTS_FILE).is_file() else SAFE_WEIGHTS)


def _json(name: str, change: Callable[[dict], None]) -> Edit:
    def edit(folder: Path, world: Path) -> None:
        data = json.loads((folder / name).read_text())
        change(data)
        (folder / name).write_text(json.dumps(data))
    return edit


def _text(name: str, text: str) -> Edit:
    return lambda folder, world: (folder / name).write_text(text)


def _tensor(change: Callable[[torch.Tensor], torch.Tensor]) -> Edit:
    def edit(folder: Path, world: Path) -> None:
        state = load_file(str(_weights(folder)))
        state[KEY] = change(state[KEY])
        save_file(state, str(_weights(folder)), metadata={"format": "pt"})
    return edit


def _poke(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def change(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[3] = value
        return t
    return change


def _truncate(folder: Path, world: Path) -> None:
    raw = _weights(folder).read_bytes()
    _weights(folder).write_bytes(raw[: len(raw) // 2])


def _bin_only(folder: Path, world: Path) -> None:
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")


def _pickle_bin(folder: Path, world: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Pickled(folder.parent / MARKER)))


def _drop(key: str) -> Edit:
    def edit(folder: Path, world: Path) -> None:
        state = load_file(str(_weights(folder)))
        del state[key]
        save_file(state, str(_weights(folder)), metadata={"format": "pt"})
    return edit


def _weights_from(source: str) -> Edit:
    return lambda folder, world: shutil.copy(world / source, _weights(folder))


def _also_dense_name(folder: Path, world: Path) -> None:
    """A compressed folder that also holds its weights under the dense name: ambiguous."""
    shutil.copy(folder / WEIGHTS_FILE, folder / SAFE_WEIGHTS)


def _custom_code(folder: Path, world: Path) -> None:
    """A folder that asks for its own Python: a custom model_type and an auto_map naming modules
    that create the marker when imported."""
    for module in ("configuration_evil", "modeling_evil"):
        (folder / f"{module}.py").write_text(EVIL_SOURCE.format(marker=str(folder.parent / MARKER)))
    _json("config.json", lambda c: c.update(model_type="evilclip", auto_map={
        "AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}))(folder, world)


def _shard(folder: Path, world: Path) -> None:
    """Split model.safetensors into two shards and an index, as save_pretrained does for big models."""
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    keys = sorted(state)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _first_group(change: Callable[[dict], None]) -> Edit:
    return _json("upop_plan.json", lambda plan: change(next(iter(plan["groups"].values()))))


def _both(*edits: Edit) -> Edit:
    def edit(folder: Path, world: Path) -> None:
        for e in edits:
            e(folder, world)
    return edit

NO_CODE = "never runs code from model folders"

# case -> (folder it edits: "model" (dense) or "compressed", edit, text the one-line message must contain)
CASES = {
    # code from the folder
    "auto_map with a custom model_type": ("model", _custom_code, NO_CODE),
    "auto_map with a known model_type": ("model", _json("config.json", lambda c: c.update(
        auto_map={"AutoModel": "modeling_evil.EvilModel"})), "config.json has an auto_map"),
    "custom model_type without auto_map": ("model", _json("config.json", lambda c: c.update(model_type="evilclip")),
                                           "'evilclip'"),
    "auto_map in tokenizer_config.json": ("model", _json("tokenizer_config.json", lambda c: c.update(
        auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})),
        "tokenizer_config.json has an auto_map"),
    "compressed: auto_map": ("compressed", _custom_code, NO_CODE),
    # weights that are not safetensors, or damaged
    "pytorch_model.bin only": ("model", _bin_only, "use_safetensors=False"),
    "pickle in pytorch_model.bin": ("model", _pickle_bin, "pytorch_model.bin"),
    "bool tensor": ("model", _tensor(lambda t: t > 0), f"'{KEY}' is torch.bool"),
    "integer tensor": ("model", _tensor(lambda t: (t * 100).to(torch.int32)), f"'{KEY}' is torch.int32"),
    "NaN in a tensor": ("model", _tensor(_poke(float("nan"))), f"'{KEY}' has 1 NaN/Inf"),
    "Inf in a tensor": ("model", _tensor(_poke(float("inf"))), f"'{KEY}' has 1 NaN/Inf"),
    "truncated safetensors": ("model", _truncate, "model.safetensors': cannot be read as a safetensors file"),
    "not a safetensors file": ("model", _text("model.safetensors", "garbage"), "cannot be read as a safetensors file"),
    "missing tensor": ("model", _drop(KEY), f"no tensor '{KEY}'"),
    "weights of another size": ("model", _weights_from("other-size.safetensors"), "different-size model"),
    "sharded: NaN in a shard": ("model", _both(_tensor(_poke(float("nan"))), _shard), "-of-00002.safetensors': tensor"),
    "sharded: index names a file outside the folder": ("model", _both(_shard, _json(
        "model.safetensors.index.json", lambda i: i["weight_map"].update({KEY: "../x.safetensors"}))),
        "'../x.safetensors' is not a .safetensors file in the same folder"),
    "config.json not JSON": ("model", _text("config.json", "{not json"), "config.json': not valid JSON"),
    "config.json a list": ("model", _text("config.json", "[1, 2]"), "not an object"),
    "compressed: bool tensor": ("compressed", _tensor(lambda t: t > 0), f"'{KEY}' is torch.bool"),
    "compressed: integer tensor": ("compressed", _tensor(lambda t: t.to(torch.int64)), f"'{KEY}' is torch.int64"),
    "compressed: NaN in a tensor": ("compressed", _tensor(_poke(float("nan"))), "NaN/Inf"),
    "compressed: Inf in a tensor": ("compressed", _tensor(_poke(float("-inf"))), "NaN/Inf"),
    "compressed: truncated safetensors": ("compressed", _truncate, "cannot be read as a safetensors file"),
    "compressed: dense weights": ("compressed", _weights_from("model/model.safetensors"), "has shape"),
    "compressed: weights under both names": ("compressed", _also_dense_name,
                                             f"holds both {WEIGHTS_FILE} (upop's compressed weights) and "
                                             f"{SAFE_WEIGHTS}"),
    "compressed: config.json not JSON": ("compressed", _text("config.json", "{"), "config.json': not valid JSON"),
    # the plan
    "plan nested 200k deep": ("compressed", _text("upop_plan.json", "[" * 200_000 + "]" * 200_000), "nested deeper"),
    "plan not JSON": ("compressed", _text("upop_plan.json", '{"groups": '), "upop_plan.json': not valid JSON"),
    "plan groups []": ("compressed", _json("upop_plan.json", lambda p: p.update(groups=[])), "groups is []"),
    "plan groups {}": ("compressed", _json("upop_plan.json", lambda p: p.update(groups={})), "at least one group"),
    "plan kept 5": ("compressed", _first_group(lambda g: g.update(kept=5)), "kept is 5"),
    "plan kept unsorted": ("compressed", _first_group(lambda g: g.update(kept=[2, 1])), "kept is [2, 1]"),
    "plan kept with a bool": ("compressed", _first_group(lambda g: g.update(kept=[False, 1])), "kept is [False, 1]"),
    "plan kept out of range": ("compressed", _first_group(lambda g: g["kept"].append(999)), "999 is outside"),
    "plan dense_units a string": ("compressed", _first_group(lambda g: g.update(dense_units=str(g["dense_units"]))),
                                  "dense_units is '"),
    "plan group without kind": ("compressed", _first_group(lambda g: g.pop("kind")), "missing kind"),
    "plan unknown field": ("compressed", _json("upop_plan.json", lambda p: p.update(extra=1)), "unknown ['extra']"),
    "plan format_version true": ("compressed", _json("upop_plan.json", lambda p: p.update(format_version=True)),
                                 "format_version True"),
    "plan model_class of another known class": ("compressed", _json("upop_plan.json", lambda p: p.update(
        model_class="ViTForImageClassification")), "'ViTForImageClassification' is not the class config.json records"),
    "plan model_class of another class, config without architectures": ("compressed", _both(
        _json("upop_plan.json", lambda p: p.update(model_class="ViTForImageClassification")),
        _json("config.json", lambda c: c.pop("architectures"))), "needs a ViTConfig"),
    "plan model_class with a newline and NUL": ("compressed", _json("upop_plan.json", lambda p: p.update(
        model_class="CLIP\nModel\x00")), "'CLIP\\nModel\\x00'"),
}


def _folder(world: Path, tmp: Path, case: str) -> Path:
    source, edit, _ = CASES[case]
    folder = tmp / "m"
    shutil.copytree(world / source, folder)
    edit(folder, world)
    return folder


def _one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_refuses_in_one_line(case, world, tmp_path, capsys):
    folder = _folder(world, tmp_path, case)
    capsys.readouterr()
    code = main(["evaluate", "--model", str(folder), "--task", "retrieval", "--data", str(world / "data")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = _one_line(err)
    assert line.startswith("upop: error: ") and CASES[case][2] in line, line
    assert not (tmp_path / MARKER).exists(), "code from the model folder ran"


@pytest.mark.parametrize("case", sorted(CASES))
def test_api_refuses_with_a_checkpoint_error(case, world, tmp_path):
    folder = _folder(world, tmp_path, case)
    load = upop.load_compressed if CASES[case][0] == "compressed" else upop.load_model
    with pytest.raises(upop.CheckpointError) as info:
        load(folder)
    message = str(info.value)
    assert CASES[case][2] in message and "\n" not in message and "\x00" not in message, message
    assert not (tmp_path / MARKER).exists(), "code from the model folder ran"


def test_the_bin_hint_converts_the_folder(world, tmp_path):
    """The command in the pytorch_model.bin message is one that works."""
    folder = _folder(world, tmp_path, "pytorch_model.bin only")
    with pytest.raises(upop.CheckpointError) as info:
        upop.load_model(folder)
    command = str(info.value).split("Convert it once with: ")[1]
    assert command.startswith('python -c "') and command.endswith('"')
    exec(command[len('python -c "'):-1], {})  # noqa: S102  (our own message's code)
    model, _ = upop.load_model(folder)
    reference, _ = upop.load_model(world / "model")
    assert torch.equal(model.state_dict()[KEY], reference.state_dict()[KEY])


def test_sharded_safetensors_load(world, tmp_path):
    """The checks read every shard an index names; a sound sharded folder loads unchanged."""
    folder = tmp_path / "m"
    shutil.copytree(world / "model", folder)
    _shard(folder, world)
    model, _ = upop.load_model(folder)
    reference, _ = upop.load_model(world / "model")
    assert all(torch.equal(t, reference.state_dict()[k]) for k, t in model.state_dict().items())


def test_a_hub_id_fetches_data_files_only(world, tmp_path, monkeypatch):
    """A Hub id is fetched as a snapshot of configs, safetensors and vocabularies (never Python or
    pickles) and then checked and loaded like a local folder."""
    import fnmatch

    import huggingface_hub

    def snapshot_download(repo_id, allow_patterns):
        assert repo_id == "someone/tiny-clip"
        fetched = [name for name in ("config.json", "model.safetensors", WEIGHTS_FILE, UPOP_INDEX, "tokenizer.json",
                                     "vocab.txt", "modeling_x.py", "pytorch_model.bin", "model.pkl")
                   if any(fnmatch.fnmatch(name, pattern) for pattern in allow_patterns)]
        assert fetched == ["config.json", "model.safetensors", WEIGHTS_FILE, UPOP_INDEX, "tokenizer.json", "vocab.txt"]
        shutil.copytree(world / "model", tmp_path / "snapshot")
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model, processor = upop.load_model("someone/tiny-clip")
    assert type(model).__name__ == "CLIPModel" and processor is not None


def test_json_size_is_checked_before_parsing(world, tmp_path, monkeypatch):
    import upop.checkpoint.safe_load as safe_load

    monkeypatch.setattr(safe_load, "MAX_JSON_BYTES", 100)
    with pytest.raises(upop.CheckpointError, match=r"upop_plan.json': [0-9,]+ bytes, more than the 100 "):
        upop.load_compressed(world / "compressed")


# ---- a hostile folder with ``yes`` on stdin: transformers' [y/N] prompt must never be reached ----

DRIVER = """
import contextlib, io, json, pathlib, sys
import upop
from upop.checkpoint.folder import WEIGHTS_FILE
from upop.checkpoint.safe_load import SAFE_WEIGHTS, UPOP_INDEX
from upop.cli.main import main
from upop.models.folders import load_processor_or_none

data, out, dense, compressed, marker = sys.argv[1:6]
tiny = ["--search-epochs", "1", "--retrain-epochs", "1", "--batch-size", "8", "--no-progress"]


def processor():
    load_processor_or_none(dense)  # called on its own, without load_any's folder check first
    return 0


runs = {
    "compress": lambda: main(["compress", "--model", dense, "--task", "retrieval", "--data", data, "--out", out,
                              *tiny]),
    "evaluate": lambda: main(["evaluate", "--model", dense, "--task", "retrieval", "--data", data]),
    "evaluate compressed": lambda: main(["evaluate", "--model", compressed, "--task", "retrieval", "--data", data]),
    "load_compressed": lambda: upop.load_compressed(compressed),
    "load_processor_or_none": processor,
}
results = {}
for name, run in runs.items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = run()
        except upop.CheckpointError as exc:
            code, err = 2, io.StringIO("upop: error: " + str(exc))
        except Exception as exc:  # recorded, so the test names the entry point that failed
            code, err = -1, io.StringIO("Traceback: " + repr(exc))
    results[name] = {"code": code, "err": err.getvalue(), "ran": pathlib.Path(marker).exists()}
print("RESULTS " + json.dumps(results))
"""

# entry point -> (exit code, text its one error line must contain; "" for none)
STDIN_CASES = {
    "compress": (2, NO_CODE),
    "evaluate": (2, NO_CODE),
    "evaluate compressed": (2, NO_CODE),
    "load_compressed": (2, NO_CODE),
    "load_processor_or_none": (0, ""),
}


@pytest.fixture(scope="module")
def with_yes(world, tmp_path_factory):
    """One process runs every entry point on hostile folders, with ``yes`` piped to stdin."""
    root = tmp_path_factory.mktemp("yes")
    for name, source in (("dense", "model"), ("compressed", "compressed")):
        shutil.copytree(world / source, root / name)
        _custom_code(root / name, world)
    _json("tokenizer_config.json", lambda c: c.update(
        auto_map={"AutoTokenizer": ["modeling_evil.EvilTokenizer", None]}))(root / "dense", world)
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(world / "data"), str(root / "out"), str(root / "dense"),
         str(root / "compressed"), str(root / MARKER)],
        input="yes\n" * 10_000, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = proc.stdout.rsplit("RESULTS ", 1)[1]  # after a prompt, if one was (wrongly) shown
    return root, proc, json.loads(results)


@pytest.mark.parametrize("entry", sorted(STDIN_CASES))
def test_yes_on_stdin_changes_nothing(entry, with_yes):
    root, proc, results = with_yes
    result = results[entry]
    assert not result["ran"], "code from the model folder ran"
    assert "[y/N]" not in proc.stdout + proc.stderr, "transformers' remote-code prompt was reached"
    code, needle = STDIN_CASES[entry]
    assert result["code"] == code and "Traceback" not in result["err"]
    if needle:
        line = _one_line(result["err"])
        assert line.startswith("upop: error: ") and needle in line, line
    assert not (root / "out").exists()


# ---- every key that makes a library import code, in every file it can appear in ----------------

EVIL_MAP = {"AutoModel": "modeling_evil.EvilModel"}
EVIL_PIPELINE = {"evil-task": {"impl": "evil/repo--pipe.EvilPipeline", "pt": ["AutoModel"], "type": "multimodal"}}


def _put(*path_and_value) -> Callable[[object], object]:
    """An edit of parsed JSON (None for a file that does not exist yet): set ``path`` to ``value``."""
    *path, value = path_and_value

    def change(data):
        data = {} if data is None else data
        node = data
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
        return data
    return change


def _modules(kind: str, sub: str = "") -> Callable[[object], object]:
    return lambda data: [{"idx": 0, "name": "0", "path": sub, "type": kind}]


# case -> (file, edit of its parsed JSON, text naming the file and the key)
HOOKS = {
    "config.json custom_pipelines": ("config.json", _put("custom_pipelines", EVIL_PIPELINE),
                                     "config.json has custom_pipelines"),
    "config.json text_config.auto_map": ("config.json", _put("text_config", "auto_map", EVIL_MAP),
                                         "config.json has an auto_map (at text_config.auto_map)"),
    "config.json text_config.custom_pipelines": ("config.json", _put("text_config", "custom_pipelines", EVIL_PIPELINE),
                                                 "config.json has text_config.custom_pipelines"),
    "config.json trust_remote_code": ("config.json", _put("trust_remote_code", True),
                                      "config.json sets trust_remote_code to True"),
    "config.json attn_implementation of a Hub kernel": ("config.json", _put("attn_implementation", "evil/attn"),
                                                        "config.json has attn_implementation 'evil/attn'"),
    "config.json tokenizer_class": ("config.json", _put("tokenizer_class", "EvilTokenizer"),
                                    "config.json has tokenizer_class 'EvilTokenizer'"),
    "generation_config.json trust_remote_code": ("generation_config.json", _put("trust_remote_code", True),
                                                 "generation_config.json sets trust_remote_code"),
    "generation_config.json custom_pipelines": ("generation_config.json", _put("custom_pipelines", EVIL_PIPELINE),
                                                "generation_config.json has custom_pipelines"),
    "tokenizer_config.json auto_map": ("tokenizer_config.json", _put("auto_map", {"AutoTokenizer": ["t.Evil", None]}),
                                       "tokenizer_config.json has an auto_map"),
    "tokenizer_config.json tokenizer_class": ("tokenizer_config.json", _put("tokenizer_class", "EvilTokenizer"),
                                              "tokenizer_config.json has tokenizer_class 'EvilTokenizer'"),
    "tokenizer_config.json processor_class": ("tokenizer_config.json", _put("processor_class", "EvilProcessor"),
                                              "tokenizer_config.json has processor_class 'EvilProcessor'"),
    "tokenizer_config.json trust_remote_code": ("tokenizer_config.json", _put("trust_remote_code", True),
                                                "tokenizer_config.json sets trust_remote_code"),
    "special_tokens_map.json auto_map": ("special_tokens_map.json", _put("auto_map", EVIL_MAP),
                                         "special_tokens_map.json has an auto_map"),
    "processor_config.json auto_map": ("processor_config.json", _put("auto_map", {"AutoProcessor": "p.Evil"}),
                                       "processor_config.json has an auto_map"),
    "processor_config.json processor_class": ("processor_config.json", _put("processor_class", "EvilProcessor"),
                                              "processor_config.json has processor_class 'EvilProcessor'"),
    "processor_config.json image_processor.auto_map": (
        "processor_config.json", _put("image_processor", "auto_map", {"AutoImageProcessor": "p.Evil"}),
        "processor_config.json has an auto_map (at image_processor.auto_map)"),
    "processor_config.json image_processor.image_processor_type": (
        "processor_config.json", _put("image_processor", "image_processor_type", "EvilImageProcessor"),
        "processor_config.json has image_processor.image_processor_type 'EvilImageProcessor'"),
    "preprocessor_config.json auto_map": ("preprocessor_config.json", _put("auto_map", {"AutoImageProcessor": "p.E"}),
                                          "preprocessor_config.json has an auto_map"),
    "preprocessor_config.json image_processor_type": (
        "preprocessor_config.json", _put("image_processor_type", "EvilImageProcessor"),
        "preprocessor_config.json has image_processor_type 'EvilImageProcessor'"),
    "preprocessor_config.json feature_extractor_type": (
        "preprocessor_config.json", _put("feature_extractor_type", "EvilFeatureExtractor"),
        "preprocessor_config.json has feature_extractor_type 'EvilFeatureExtractor'"),
    "video_preprocessor_config.json auto_map": ("video_preprocessor_config.json",
                                                _put("auto_map", {"AutoVideoProcessor": "v.Evil"}),
                                                "video_preprocessor_config.json has an auto_map"),
    "video_preprocessor_config.json video_processor_type": (
        "video_preprocessor_config.json", _put("video_processor_type", "EvilVideoProcessor"),
        "video_preprocessor_config.json has video_processor_type 'EvilVideoProcessor'"),
    "audio_tokenizer_config.json auto_map": ("audio_tokenizer_config.json", _put("auto_map", EVIL_MAP),
                                             "audio_tokenizer_config.json has an auto_map"),
    "chat_template.json auto_map": ("chat_template.json", _put("auto_map", EVIL_MAP), "chat_template.json has an auto_map"),
    "modules.json foreign type": ("modules.json", _modules("evil.EvilModule"),
                                  "modules.json has module 0 of type 'evil.EvilModule'"),
    "modules.json Dense activation_function": ("1_Dense/config.json", _put("activation_function", "os.system"),
                                               "whose config.json has activation_function 'os.system'"),
    "sentence_bert_config.json model_args.trust_remote_code": (
        "sentence_bert_config.json", _put("model_args", "trust_remote_code", True),
        "sentence_bert_config.json sets model_args.trust_remote_code to True"),
    "sentence_bert_config.json config_kwargs.trust_remote_code": (
        "sentence_bert_config.json", _put("config_kwargs", "trust_remote_code", True),
        "sentence_bert_config.json sets config_kwargs.trust_remote_code"),
    "config_sentence_transformers.json trust_remote_code": (
        "config_sentence_transformers.json", _put("trust_remote_code", True),
        "config_sentence_transformers.json sets trust_remote_code"),
    "custom_generate folder": ("custom_generate/generate.py", None, "has a custom_generate folder"),
}


def _hooked(source: Path, folder: Path, case: str) -> Path:
    """A copy of ``source`` with the code hook of ``case`` (and, for a sentence-transformers
    module's file, the modules.json that names its folder)."""
    name, change, _ = HOOKS[case]
    shutil.copytree(source, folder)
    file = folder / name
    file.parent.mkdir(parents=True, exist_ok=True)
    if change is None:  # a file of code, not a key
        file.write_text(EVIL_SOURCE.format(marker=str(folder.parent / MARKER)))
        return folder
    file.write_text(json.dumps(change(json.loads(file.read_text()) if file.is_file() else None)))
    if name.startswith("1_Dense/"):
        (folder / "modules.json").write_text(json.dumps(
            [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
             {"idx": 1, "name": "1", "path": "1_Dense", "type": "sentence_transformers.models.Dense"}]))
    return folder


@pytest.mark.parametrize("source", ["model", "compressed"])
@pytest.mark.parametrize("case", sorted(HOOKS))
def test_code_hooks_are_refused_on_input(case, source, world, tmp_path):
    """Each hook, in a dense and in a compressed folder: one line naming the file and the key."""
    folder = _hooked(world / source, tmp_path / "m", case)
    load = upop.load_compressed if source == "compressed" else upop.load_model
    with pytest.raises(upop.CheckpointError) as info:
        load(folder)
    message = str(info.value)
    assert "\n" not in message and HOOKS[case][2] in message and NO_CODE in message, message
    assert message.startswith(repr(str(folder)) + ": "), message
    assert not (tmp_path / MARKER).exists()


@pytest.mark.parametrize("case", sorted(HOOKS))
def test_code_hooks_are_never_written(case, world, tmp_path):
    """A base model folder whose files carry the hook (edited after the model was loaded):
    save_compressed copies its tokenizer / processor files only without hooks. Either the save
    is refused in one line naming the file and the key (nothing written), or the folder it
    writes has no such key (upop's own loader, which refuses every hook, reads it)."""
    model, _ = upop.load_model(world / "model")
    masks = upop.attach_masks(model)
    masks[masks.groups[0].name].data[:2] = 0
    plan = prune(model, masks)
    base = _hooked(world / "model", tmp_path / "base", case)
    plan = type(plan).from_dict({**plan.to_dict(), "base_model": str(base)})
    try:
        upop.save_compressed(model, tmp_path / "out", plan=plan)
    except upop.CheckpointError as exc:
        file = HOOKS[case][0]
        assert "\n" not in str(exc) and f"the compressed folder's {file}" in str(exc), str(exc)
        assert not (tmp_path / "out").exists()
        return
    upop.load_compressed(tmp_path / "out")
    assert not (tmp_path / "out" / HOOKS[case][0]).exists() or HOOKS[case][0] == "config.json"
    assert not (tmp_path / "out" / "custom_generate").exists()


# set in Python on the model's config (what a Trainer script might do) -> key path named
PYTHON_HOOKS = {
    "custom_pipelines": (("custom_pipelines",), EVIL_PIPELINE, "has custom_pipelines"),
    "trust_remote_code": (("trust_remote_code",), True, "sets trust_remote_code to True"),
    "a foreign auto_map": (("auto_map",), EVIL_MAP, "has an auto_map"),
    "a sub-config's auto_map": (("text_config", "auto_map"), EVIL_MAP, "has an auto_map (at text_config.auto_map)"),
    "tokenizer_class": (("tokenizer_class",), "EvilTokenizer", "has tokenizer_class 'EvilTokenizer'"),
}


@pytest.mark.parametrize("case", sorted(PYTHON_HOOKS))
def test_a_hook_set_in_python_is_refused_on_save(case, world, tmp_path):
    """upop.save_compressed and save_pretrained of a pruned model whose config got a code hook in
    Python: refused in one line, before anything is written (save_compressed and save_pretrained)."""
    path, value, needle = PYTHON_HOOKS[case]
    model, _ = upop.load_model(world / "model")
    masks = upop.attach_masks(model)
    masks[masks.groups[0].name].data[:2] = 0
    prune(model, masks)
    target = model.config
    for name in path[:-1]:
        target = getattr(target, name)
    setattr(target, path[-1], value)
    with pytest.raises(upop.CheckpointError) as info:
        upop.save_compressed(model, tmp_path / "out")
    assert "\n" not in str(info.value) and f"the model's config {needle}" in str(info.value), str(info.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(upop.CheckpointError, match="the model's config"):
        model.save_pretrained(tmp_path / "pretrained")
    assert not (tmp_path / "pretrained").exists()


def test_a_generation_config_hook_is_refused_on_save(tmp_path):
    model = upop.models.folders.make_model("blip-caption")
    masks = upop.attach_masks(model)
    masks[masks.groups[0].name].data[:2] = 0
    prune(model, masks)
    model.generation_config.trust_remote_code = True
    with pytest.raises(upop.CheckpointError, match="the model's generation config sets trust_remote_code to True"):
        upop.save_compressed(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_only_keys_the_config_class_defines_are_written(world, tmp_path):
    """Harmless keys the config class does not define (set in Python, or carried by a loaded
    folder) are dropped; every key the class defines is kept, with its value."""
    model, processor = upop.load_model(world / "model")
    masks = upop.attach_masks(model)
    masks[masks.groups[0].name].data[:2] = 0
    prune(model, masks)
    model.config.my_note = "not a CLIPConfig field"
    model.config.text_config.my_other_note = 3
    upop.save_compressed(model, tmp_path / "out", processor=processor)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    dense = json.loads((world / "model" / "config.json").read_text())
    assert "my_note" not in written and "my_other_note" not in written["text_config"]
    assert set(written) == set(dense) | {"auto_map", "upop_shapes"}
    assert dense["text_config"].items() <= written["text_config"].items()
    assert written["projection_dim"] == dense["projection_dim"]
    loaded = upop.load_compressed(tmp_path / "out")
    assert not hasattr(loaded.config, "my_note")


def test_only_data_files_of_a_processor_are_written(world, tmp_path):
    """A processor whose save_pretrained also writes a Python file: the file is not copied."""
    model, processor = upop.load_model(world / "model")
    masks = upop.attach_masks(model)
    masks[masks.groups[0].name].data[:2] = 0
    prune(model, masks)

    class Writes:
        def save_pretrained(self, folder):
            processor.save_pretrained(folder)
            (Path(folder) / "processing_evil.py").write_text("raise SystemExit(3)\n")
            (Path(folder) / "notes.bin").write_bytes(b"\0")

    upop.save_compressed(model, tmp_path / "out", processor=Writes())
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert "processing_evil.py" not in names and "notes.bin" not in names
    assert {"config.json", "upop_plan.json", WEIGHTS_FILE, "modeling_upop.py", "tokenizer.json"} <= names


# ---- every loaded tensor is accounted for, in every family upop can make -------------------------

def _stored_group(model, stored: set[str]) -> list[str]:
    """A tied group (several names, one tensor) of ``model`` if it has one, else one weight."""
    from upop.checkpoint.folder import tied_groups

    groups = tied_groups(model)
    tied = [g for g in groups if len(g) > 1 and any(k in stored for k in g)]
    return tied[0] if tied else next(g for g in groups if g[0].endswith(".weight") and g[0] in stored)


@pytest.mark.parametrize("family", upop.models.folders.FAMILIES)
def test_a_missing_tensor_is_refused_in_every_family(family, tmp_path):
    """Delete every stored member of a tied group (or, for a family without one, one weight)
    from a compressed folder: load_compressed refuses in one line naming the tensor."""
    model = upop.models.folders.make_model(family)
    masks = upop.attach_masks(model)
    masks[masks.groups[0].name].data[:1] = 0
    prune(model, masks)
    upop.save_compressed(model, tmp_path / "c")
    state = load_file(str(tmp_path / "c" / WEIGHTS_FILE))
    group = _stored_group(model, set(state))
    for key in group:
        state.pop(key, None)
    save_file(state, str(tmp_path / "c" / WEIGHTS_FILE), metadata={"format": "pt"})
    with pytest.raises(upop.CheckpointError) as info:
        upop.load_compressed(tmp_path / "c")
    message = str(info.value)
    assert "\n" not in message and "missing tensor" in message and "randomly initialised" in message, message
    assert any(f"missing tensor {key!r}" in message for key in group), (group, message)


def test_blip_caption_tied_pair_missing_is_refused_by_the_cli(world, tmp_path, capsys):
    """The reported case: BLIP's decoder embeddings and LM head (one tied pair) both removed."""
    model = upop.models.folders.make_model("blip-caption")
    masks = upop.attach_masks(model)
    masks[masks.groups[0].name].data[:1] = 0
    prune(model, masks)
    upop.save_compressed(model, tmp_path / "c")
    state = load_file(str(tmp_path / "c" / WEIGHTS_FILE))
    for key in ("text_decoder.bert.embeddings.word_embeddings.weight", "text_decoder.cls.predictions.decoder.weight",
                "text_decoder.cls.predictions.bias"):
        state.pop(key, None)
    save_file(state, str(tmp_path / "c" / WEIGHTS_FILE), metadata={"format": "pt"})
    capsys.readouterr()
    code = main(["evaluate", "--model", str(tmp_path / "c"), "--task", "retrieval", "--data", str(world / "data")])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and line.startswith("upop: error: ") and "missing tensor 'text_decoder." in line, line


def _offline_hub(monkeypatch, cache, repos: dict) -> None:
    """A Hugging Face cache at ``cache`` holding each ``repos`` id's folder as its main snapshot, and
    the Hub offline (HF_HUB_OFFLINE=1: no network)."""
    import huggingface_hub.constants as hub_constants

    for repo, folder in repos.items():
        entry = cache / ("models--" + repo.replace("/", "--"))
        shutil.copytree(folder, entry / "snapshots" / ("0" * 40))
        (entry / "refs").mkdir()
        (entry / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))


def test_load_compressed_takes_a_hub_id_from_the_offline_cache(tmp_path, monkeypatch):
    """``upop.load_compressed("org/name")`` resolves a Hub id as ``from_pretrained`` does: here from
    the Hugging Face cache with HF_HUB_OFFLINE=1 (no network); the cached copy loads exactly, and
    an id the cache lacks is one line."""
    from ._families import prune_every_third

    model = prune_every_third(upop.models.folders.make_model("vit"))
    folder = tmp_path / "compressed"
    upop.save_compressed(model, folder)
    _offline_hub(monkeypatch, tmp_path / "hub", {"org/tiny-vit": folder})
    loaded = upop.load_compressed("org/tiny-vit")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x).logits, upop.load_compressed(folder)(pixel_values=x).logits)
    with pytest.raises(upop.CheckpointError, match="org/missing") as info:
        upop.load_compressed("org/missing")
    assert "\n" not in str(info.value)


def test_compress_takes_a_dense_hub_id_from_the_offline_cache(tmp_path, monkeypatch):
    """``upop compress --model org/name`` resolves a dense model's Hub id from the Hugging Face cache
    with HF_HUB_OFFLINE=1 (no network), runs, and records the id as the base model."""
    from upop.cli.main import main
    from upop.data import shapes_min_split, shapes_writer

    assert main(["make-model", "vit", "--out", str(tmp_path / "dense"), "--size", "tiny", "--image-size", "32"]) == 0
    n = shapes_min_split("classification")
    shapes_writer("classification")(tmp_path / "data", train=n, val=n, test=n, image_size=32, seed=0)
    _offline_hub(monkeypatch, tmp_path / "hub", {"org/dense-vit": tmp_path / "dense"})
    out = tmp_path / "out"
    assert main(["compress", "--model", "org/dense-vit", "--task", "classification", "--data", str(tmp_path / "data"),
                 "--ratio", "0.5", "--out", str(out), "--search-epochs", "1", "--retrain-epochs", "1",
                 "--batch-size", "4", "--latency-time", "0.02", "--no-progress"]) == 0
    plan = json.loads((out / "compressed" / "upop_plan.json").read_text())
    assert plan["base_model"] == "org/dense-vit" and plan["achieved_ratio"]["params"] >= 0.5 - 1e-9
