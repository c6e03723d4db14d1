"""Adversarial rows: loading (see tests/test_adversarial.py).

A model folder (dense, or a compressed one upop wrote) that asks a library to import code, or
whose weights leave a tensor out: upop refuses it in one line naming the file and the key (or
the tensor), changes nothing the user had, and writes nothing; and a model whose Python config
carries a code hook is never saved with it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

from safetensors.torch import load_file, save_file

import upop
from upop.checkpoint.folder import WEIGHTS_FILE

from ._adversarial_common import Row, compress, write

NO_CODE = "upop never runs code from model folders"
PIPELINE = {"evil-task": {"impl": "evil/repo--pipe.EvilPipeline", "pt": ["AutoModel"], "type": "multimodal"}}


def _edit_json(folder: Path, name: str, change: Callable[[Any], Any]) -> None:
    file = folder / name
    data = json.loads(file.read_text()) if file.is_file() else None
    write(file, json.dumps(change(data)))


def _set(key: str, value: Any) -> Callable[[Any], Any]:
    return lambda data: {**(data or {}), key: value}


def _model_with(name: str, change: Callable[[Any], Any]) -> Callable[[Path, Path], list[str]]:
    """``upop compress --model`` of a copy of the world's model whose ``name`` got ``change``."""
    def setup(w: Path, tmp: Path) -> list[str]:
        shutil.copytree(w / "model", tmp / "model")
        _edit_json(tmp / "model", name, change)
        return compress(w, tmp / "out", model=tmp / "model")
    return setup


def _compressed_with(edit: Callable[[Path], None]) -> Callable[[Path, Path], list[str]]:
    """``upop evaluate --model`` of a copy of the world's compressed folder after ``edit``."""
    def setup(w: Path, tmp: Path) -> list[str]:
        shutil.copytree(w / "run" / "compressed", tmp / "compressed")
        edit(tmp / "compressed")
        return ["evaluate", "--model", str(tmp / "compressed"), "--task", "retrieval", "--data", str(w / "data")]
    return setup


def _drop_tensor(key: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        state = load_file(str(folder / WEIGHTS_FILE))
        del state[key]
        save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    return edit


def _nothing_written(w: Path, tmp: Path) -> None:
    assert not (tmp / "out" / "compressed").exists(), "a compressed folder was written"


def _save_with_custom_pipelines(w: Path, tmp: Path) -> Callable[[], Any]:
    """The API case: a pruned model whose config got ``custom_pipelines`` in Python."""
    from upop.pruning.prune import prune

    model, _ = upop.load_model(w / "model")
    masks = upop.attach_masks(model)
    masks[masks.groups[0].name].data[:2] = 0
    prune(model, masks)
    model.config.custom_pipelines = PIPELINE
    return lambda: upop.save_compressed(model, tmp / "out")


def _out_absent(w: Path, tmp: Path) -> None:
    assert not (tmp / "out").exists(), "save_compressed wrote a folder"


ROWS: dict[str, Row] = {
    "loading: custom_pipelines in the input config.json": Row(
        _model_with("config.json", _set("custom_pipelines", PIPELINE)),
        needle="config.json has custom_pipelines", watch=("model",), after=_nothing_written),
    "loading: auto_map in the input tokenizer_config.json": Row(
        _model_with("tokenizer_config.json", _set("auto_map", {"AutoTokenizer": ["tokenization_evil.Evil", None]})),
        needle="tokenizer_config.json has an auto_map", watch=("model",), after=_nothing_written),
    "loading: auto_map in the input preprocessor_config.json": Row(
        _model_with("preprocessor_config.json", _set("auto_map", {"AutoImageProcessor": "image_evil.Evil"})),
        needle="preprocessor_config.json has an auto_map", watch=("model",), after=_nothing_written),
    "loading: sentence-transformers modules.json with a foreign type": Row(
        _model_with("modules.json", lambda _: [{"idx": 0, "name": "0", "path": "", "type": "evil_pkg.EvilModule"}]),
        needle="modules.json has module 0 of type 'evil_pkg.EvilModule'", watch=("model",), after=_nothing_written),
    "loading: trust_remote_code in sentence_bert_config.json": Row(
        _model_with("sentence_bert_config.json", _set("model_args", {"trust_remote_code": True})),
        needle="sentence_bert_config.json sets model_args.trust_remote_code to True", watch=("model",),
        after=_nothing_written),
    "loading: a tokenizer_class transformers does not define": Row(
        _model_with("tokenizer_config.json", _set("tokenizer_class", "EvilTokenizer")),
        needle="tokenizer_config.json has tokenizer_class 'EvilTokenizer'", watch=("model",), after=_nothing_written),
    "loading: auto_map in a compressed folder's preprocessor_config.json": Row(
        _compressed_with(lambda f: _edit_json(f, "preprocessor_config.json", _set(
            "auto_map", {"AutoImageProcessor": "image_evil.Evil"}))),
        needle="preprocessor_config.json has an auto_map", watch=("compressed",)),
    "loading: custom_pipelines in a compressed folder's config.json": Row(
        _compressed_with(lambda f: _edit_json(f, "config.json", _set("custom_pipelines", PIPELINE))),
        needle="config.json has custom_pipelines", watch=("compressed",)),
    "loading: a foreign image_processor_type in a compressed processor_config.json": Row(
        _compressed_with(lambda f: _edit_json(f, "processor_config.json", lambda d: {
            **d, "image_processor": {**d["image_processor"], "image_processor_type": "EvilImageProcessor"}})),
        needle="processor_config.json has image_processor.image_processor_type 'EvilImageProcessor'",
        watch=("compressed",)),
    "loading: a custom_generate folder in a compressed folder": Row(
        _compressed_with(lambda f: write(f / "custom_generate" / "generate.py", "raise SystemExit(3)\n")),
        needle="has a custom_generate folder", watch=("compressed",)),
    "loading: a needed tensor removed from a compressed folder": Row(
        _compressed_with(_drop_tensor("text_model.embeddings.token_embedding.weight")),
        needle="missing tensor 'text_model.embeddings.token_embedding.weight'", watch=("compressed",)),
    "loading: save_compressed of a config with custom_pipelines set in Python": Row(
        _save_with_custom_pipelines, needle="the model's config has custom_pipelines", watch=("out",),
        error=upop.CheckpointError, after=_out_absent),
}
