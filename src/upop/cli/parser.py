"""The argument parser of the ``upop`` command line (:func:`build_parser`); :mod:`upop.cli.main` runs it.

Every ``UPopConfig`` field is an option of ``upop compress`` (its help and choices come from the
config's metadata); argparse errors are one line, ``upop: error: ...``, with exit code 2.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from upop.config import AUTO_INTS, INT_RANGES, LATENCY_TIME_RANGE, SEED_RANGE, UPopConfig, config_fields
from upop.errors import show
from upop.tasks.registry import task_names, task_summaries

EXIT_USER_ERROR = 2

SPLIT_SIZE_RANGE = (1, 100_000)
"""Images (VQA: images, NLVR2: pairs) per split ``upop data shapes`` writes."""
SHAPES_IMAGE_SIZE_RANGE = (16, 512)
"""Side of the Shapes images in pixels (the renderer's limits)."""
MODEL_IMAGE_SIZE_RANGE = (16, 1024)
"""Input side of a ``make-model`` model in pixels (patches of 8 up to 96, of 16 above)."""
NUM_LABELS_RANGE = (1, 100_000)
EXPORT_BATCH_RANGE = (1, 4096)

COMPRESS_GROUPS = {"data": "data and task", "search": "UPop search", "distill": "distillation",
                   "training": "training", "run": "run folder", "devices": "devices and precision"}
"""The sections of ``upop compress --help``, by the ``group`` key of the settings' metadata
(:mod:`upop.config`), in the order they are listed."""


def _int_in(name: str, low: int, high: int, sep: str = "="):
    """An argparse type: an integer in ``[low, high]``, else one line naming ``name``, the value
    and the range (argparse prints it as ``upop: error: argument --x: ...``)."""
    def parse(text: str) -> int:
        try:
            value = int(text.strip()) if len(text) <= 40 else None
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            shown = show(value) if value is not None else show(text)
            raise argparse.ArgumentTypeError(f"{name}{sep}{shown} is not allowed; need an integer in [{low}, {high}]")
        return value

    parse.__name__ = "integer"
    return parse


def _float_in(name: str, low: float, high: float, sep: str = "="):
    """An argparse type: a number in ``[low, high]`` (like :func:`_int_in`)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            shown = show(value) if value is not None else show(text)
            raise argparse.ArgumentTypeError(f"{name}{sep}{shown} is not allowed; need a number in "
                                             f"[{low:g}, {high:g}]")
        return value

    parse.__name__ = "number"
    return parse


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"need true or false, got {text!r}")


def _auto_or_int(name: str):
    """An argparse type for ``--round-to`` and ``--latency-batch-size``: auto or an integer in the range."""
    def parse(text: str):
        if text == "auto":
            return text
        try:
            return _int_in(name, *INT_RANGES[name])(text)
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(str(exc).replace("need an integer", "need auto or an integer")) from None

    parse.__name__ = "auto or integer"
    return parse


def _type_for(name: str, default):
    if name in AUTO_INTS:
        return _auto_or_int(name)
    if isinstance(default, bool):
        return _bool
    if name in INT_RANGES:
        return _int_in(name, *INT_RANGES[name])
    if name == "latency_time":
        return _float_in(name, *LATENCY_TIME_RANGE)
    if name in ("retrain_lr", "max_grad_norm"):
        return float
    return type(default) if default is not None else str


def _range_note(name: str) -> str:
    """The documented range of a setting for its help text ("" if it has none)."""
    if name in INT_RANGES:
        low, high = INT_RANGES[name]
        return f"; range {low}..{high}"
    if name == "latency_time":
        return f"; range {LATENCY_TIME_RANGE[0]:g}..{LATENCY_TIME_RANGE[1]:g} seconds"
    return ""


def _compress_groups(parser: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """The sections of ``compress --help`` (:data:`COMPRESS_GROUPS`), by group key."""
    return {key: parser.add_argument_group(title) for key, title in COMPRESS_GROUPS.items()}


def _add_config_options(parser: argparse.ArgumentParser, task_only: bool = False,
                        groups: dict[str, argparse._ArgumentGroup] | None = None) -> None:
    """An option per setting (only the task settings with ``task_only``): in the section of its
    ``group`` metadata when ``groups`` are given, else in one section."""
    group_of = {f.name: f.metadata.get("group") for f in fields(UPopConfig)}
    single = None if groups else parser.add_argument_group(
        "task settings" if task_only else "UPop settings (also settable in --config YAML; the command line wins)")
    for name, default, help_text, choices in config_fields(task_only):
        group = single or groups[group_of[name]]
        flag = "--" + name.replace("_", "-")
        kwargs = dict(dest=name, default=None,
                      help=f"{help_text} (default: {default}{_range_note(name)})".replace("%", "%%"))
        if choices:
            kwargs["choices"] = choices
        else:
            kwargs["type"] = _type_for(name, default)
        group.add_argument(flag, **kwargs)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``upop: error: ...`` and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"upop: error: {message} (see '{self.prog} --help')\n")


class _RegisteredFamilies:
    """The make-model families as argparse ``choices``, read from the registry on first use (a
    value to check, ``make-model --help``), so the rest of the CLI's help imports no model code."""

    def _names(self) -> tuple[str, ...]:
        from upop.arch import TINY

        return tuple(TINY)

    def __contains__(self, value) -> bool:
        return value in self._names()

    def __iter__(self):
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


class _RegisteredTasks:
    """The task names as argparse ``choices``, read from the task registry when argparse needs them
    (:func:`upop.tasks.registry.task_names`: the names the task modules declare, read from their
    source without importing them, so ``--help`` imports no torch; and any task registered from
    Python before the command line is parsed)."""

    def __contains__(self, value) -> bool:
        return value in task_names()

    def __iter__(self):
        return iter(task_names())

    def __len__(self) -> int:
        return len(task_names())


def _tasks_help(lead: str) -> str:
    """``lead``, then each task with its registered one-line summary (argparse-escaped)."""
    listed = " ".join(f"{name}: {summary}." for name, summary in task_summaries().items())
    return f"{lead}. {listed}".replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="upop", description="Compress Hugging Face vision-language and vision "
                                     "transformers with Unified and Progressive Pruning (UPop).")
    parser.add_argument("--version", action="version", version=f"upop {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    c = sub.add_parser("compress", help="search, prune and retrain a model; write the checkpoint and a report",
                       description="Search which units to prune (UPop), slice them out, retrain, and write "
                       "OUT/compressed (a checkpoint folder), OUT/report.json|md, OUT/allocation.png and logs.")
    c.add_argument("--config", help="YAML file of settings: the options of every section below but --model, --task, "
                   "--data, --check-images, --out, --resume, --restart-if-missing, --overwrite and --no-progress "
                   "(names with _ or -); options on the command line win")
    groups = _compress_groups(c)
    data, run = groups["data"], groups["run"]
    data.add_argument("--model", required=True, help="dense model: a local Hugging Face folder (or hub id)")
    data.add_argument("--task", required=True, choices=_RegisteredTasks(),
                      help=_tasks_help("task the model is fine-tuned for"))
    data.add_argument("--data", required=True, help="dataset folder in the task's format (see docs/data.md)")
    data.add_argument("--check-images", choices=["header", "full", "none"], default="header",
                      help="before training, check every image of the data set: header (open and verify the "
                      "headers; fast), full (decode every image) or none (default: header)")
    run.add_argument("--out", required=True, help="output folder")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its last checkpoint; refused if the model, data or a "
                     "setting that changes the result differs from the run's")
    run.add_argument("--restart-if-missing", action="store_true",
                     help="with --resume: start a new run if --out holds none (default: refuse)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace a previous upop run in --out (kept in OUT/.upop-previous until the new run "
                     "finished); a folder holding files upop did not write is never overwritten")
    run.add_argument("--no-progress", action="store_true",
                     help="no progress bars: a progress line every --progress-every seconds instead")
    _add_config_options(c, groups=groups)

    e = sub.add_parser("evaluate", help="print a model's metrics on a dataset split as JSON, or time it (--latency)",
                       description="Print the metrics of --model on --split of --data as JSON. With --latency, time "
                       "it instead (no metrics): alone, or against --baseline (e.g. the dense model) as a run's "
                       "report does: warm-up, then 7 rounds timing each model on the same batch of real samples "
                       "of --split (the order alternating), on the GPU if there is one. Prints JSON: the median "
                       "latency (ms) of each model, the median per-round speedup (baseline / model) with its spread, "
                       "latency_noisy (true when the interquartile range of the per-round speedups, or of a lone "
                       "model's latencies, exceeds 10% of their median: re-time on a quieter machine), and the "
                       "device, dtype, autocast, TF32, batch and CPU threads.")
    e.add_argument("--model", required=True, help="compressed (upop) or dense Hugging Face model folder")
    e.add_argument("--task", required=True, choices=_RegisteredTasks(), help="task the model was fine-tuned or compressed for")
    e.add_argument("--data", required=True, help="dataset folder")
    e.add_argument("--split", default="test", help="split to evaluate, or to take the timed samples from "
                   "(default: test)")
    e.add_argument("--batch-size", type=_int_in("batch_size", *INT_RANGES["eval_batch_size"]), default=None,
                   help="evaluation batch size (metrics; default: 64; range %d..%d)" % INT_RANGES["eval_batch_size"])
    e.add_argument("--teacher", default=None, help="task distill only: the dense model folder the compressed model's "
                   "agreement is measured against")
    timing = e.add_argument_group("latency (with --latency only)")
    timing.add_argument("--latency", action="store_true",
                        help="time --model (and --baseline) instead of computing metrics")
    timing.add_argument("--baseline", help="a second model folder (e.g. the dense model) timed interleaved with "
                        "--model; the speedup is baseline latency / model latency")
    timing.add_argument("--latency-batch-size", type=_auto_or_int("latency_batch_size"), default=None,
                        help="samples per timed forward: auto (as a run: 32 on a GPU, 1 on the CPU) or a number "
                        "(default: auto; range %d..%d)" % INT_RANGES["latency_batch_size"])
    timing.add_argument("--latency-time", type=_float_in("latency_time", *LATENCY_TIME_RANGE), default=None,
                        help="each model is timed 3 x this many seconds in all, over 7 rounds (default: 0.5, as a run; "
                        "range %g..%g seconds)" % LATENCY_TIME_RANGE)
    timing.add_argument("--eval-precision", choices=["fp32", "bf16"], default=None,
                        help="fp32, or bf16 autocast as a run with --eval-precision bf16 (default: fp32)")
    timing.add_argument("--tf32", type=_bool, default=None,
                        help="on CUDA, TF32 matmuls and convolutions as a run with --tf32 (default: true, as a run)")
    _add_config_options(e, task_only=True)

    d = sub.add_parser("data", help="write the synthetic Shapes data set, or check a data set before a run",
                       description="shapes: write the Shapes world in a task's format to --out. check: read the "
                       "data set in --data as a run will and print every problem, one per line (exit 2 if any).")
    d.add_argument("source", choices=["shapes", "check"],
                   help="shapes: write the Shapes world; check: check the data set in --data")
    d.add_argument("--task", required=True, choices=_RegisteredTasks(), help="dataset format: that of the task")
    d.add_argument("--out", help="shapes: folder to write")
    d.add_argument("--data", help="check: dataset folder to check")
    d.add_argument("--images", choices=["header", "full"], default="header",
                   help="check: 'header' opens and verifies each image without decoding it (fast); 'full' "
                   "decodes every image as training will (default: header)")
    for split, default in (("train", 2000), ("val", 200), ("test", 200)):
        d.add_argument(f"--{split}", type=_int_in(split, *SPLIT_SIZE_RANGE), default=default,
                       help=f"shapes: images in the {split} split (NLVR2: image pairs; default: {default}; range "
                       f"%d..%d; classification needs at least one per class, 10)" % SPLIT_SIZE_RANGE)
    d.add_argument("--image-size", type=_int_in("image_size", *SHAPES_IMAGE_SIZE_RANGE), default=64,
                   help="shapes: image side in pixels (default: 64; range %d..%d)" % SHAPES_IMAGE_SIZE_RANGE)
    d.add_argument("--seed", type=_int_in("seed", *SEED_RANGE), default=0,
                   help="shapes: seed of the generated data (default: 0; range %d..%d)" % SEED_RANGE)
    d.add_argument("--overwrite", action="store_true",
                   help="shapes: replace a Shapes data set in --out (default: refuse a non-empty --out)")

    m = sub.add_parser("make-model", help="write a randomly initialised model with the Shapes tokenizer")
    m.add_argument("family", choices=_RegisteredFamilies(), metavar="FAMILY",
                   help="model family: %(choices)s")
    m.add_argument("--out", required=True)
    m.add_argument("--size", default="tiny", choices=["tiny", "small", "base"])
    m.add_argument("--image-size", type=_int_in("image_size", *MODEL_IMAGE_SIZE_RANGE), default=64,
                   help="input image side in pixels (default: 64; range %d..%d)" % MODEL_IMAGE_SIZE_RANGE)
    m.add_argument("--seed", type=_int_in("seed", *SEED_RANGE), default=0,
                   help="seed of the random weights (default: 0; range %d..%d)" % SEED_RANGE)
    m.add_argument("--num-labels", type=_int_in("num_labels", *NUM_LABELS_RANGE), default=None,
                   help="classes of a classifier / segmenter (default: those of the Shapes data set of its task; "
                   "range %d..%d)" % NUM_LABELS_RANGE)
    m.add_argument("--overwrite", action="store_true",
                   help="replace a model folder upop wrote (default: refuse a non-empty --out, so a fine-tuned "
                   "model is never replaced by a random one)")

    imp = sub.add_parser("import", help="convert a salesforce/BLIP .pth (NLVR2, retrieval, VQA, captioning) to a model "
                         "folder")
    imp.add_argument("source", choices=["blip-nlvr", "blip-retrieval", "blip-vqa", "blip-caption"],
                     help="checkpoint kind: blip-nlvr (BlipForNLVR), blip-retrieval (BlipForImageTextRetrieval), "
                     "blip-vqa (BlipForQuestionAnswering), blip-caption (BlipForConditionalGeneration)")
    imp.add_argument("checkpoint", help="the .pth file")
    imp.add_argument("--out", required=True)
    imp.add_argument("--tokenizer", default=None,
                     help="local folder with bert-base-uncased's tokenizer files to copy (default: write none)")
    imp.add_argument("--overwrite", action="store_true", help="replace a model folder upop wrote")

    from upop.export.options import FORMATS, POOLINGS  # torch-free

    x = sub.add_parser("export", help="export a model folder to ONNX, checked in ONNX Runtime (needs upop[onnx])",
                       description="Export --model (a compressed or dense folder) to ONNX with a dynamic "
                       "batch axis (and sequence axis for token inputs), then run it in ONNX Runtime at two batch "
                       "sizes and compare with PyTorch: a difference above --tolerance x max(1, max |output|) is "
                       "refused and nothing is written. --out ending in .onnx is that one file; any other --out is a "
                       "folder that optimum's ORTModel classes load (model.onnx, config.json under the plain "
                       "transformers model type, the tokenizer / processor files, and a sentence-transformers "
                       "folder's modules.json and pooling config). With --pooling, a text encoder exports as a "
                       "sentence embedder (outputs last_hidden_state and sentence_embedding). With --dense, the "
                       "dense model is exported too (to a temporary file) and both are timed in ONNX Runtime in "
                       "interleaved rounds (median latency and speedup).")
    x.add_argument("--model", required=True, help="compressed (upop) or dense Hugging Face model folder")
    x.add_argument("--format", choices=FORMATS, default="onnx", help="output format (default: onnx)")
    x.add_argument("--out", required=True,
                   help="a path ending in .onnx: the one file to write; any other path: the folder to write (new or "
                   "empty; with --overwrite, files of the same names are replaced and no other file is touched)")
    x.add_argument("--pooling", choices=POOLINGS, default="none",
                   help="export a text encoder (a class that reads text only: BERT and its heads, the text models of "
                   "the two-tower families) as a sentence embedder: input_ids, attention_mask (token_type_ids where "
                   "the model has token types) -> last_hidden_state and sentence_embedding. auto: a folder with "
                   "modules.json pools as its sentence-transformers pipeline (normalised where it has Normalize); a "
                   "text encoder without it pools the mean of the real tokens (sentence-transformers' choice for a "
                   "plain transformers model); any other class exports as with none. A mode by name (cls, max, mean, "
                   "...): that pooling, unnormalised, text encoders only. none: the model's own outputs (default: "
                   "none)")
    x.add_argument("--part", choices=["vision", "text"], default=None,
                   help="CLIP / SigLIP: export one tower (vision: pixel_values -> image_embeds; text: input_ids, "
                   "attention_mask -> text_embeds); BLIP: --part vision (pixel_values -> last_hidden_state, "
                   "pooler_output); SigLIP2: --part text; default: the whole model")
    x.add_argument("--dense", default=None, help="the dense model folder: time dense vs compressed in ONNX Runtime")
    x.add_argument("--batch", type=_int_in("batch", *EXPORT_BATCH_RANGE, sep=" "), default=2,
                   help="batch of the parity check (also checked at batch + 1) and of the timing (default: 2; range "
                   "%d..%d)" % EXPORT_BATCH_RANGE)
    x.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    x.add_argument("--tolerance", type=float, default=1e-3,
                   help="largest allowed |onnx - torch| as a fraction of max(1, max |output|) (default: 1e-3)")
    x.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"], default="auto",
                   help="auto: dynamo (torch.export), the TorchScript exporter if it fails (default: auto)")
    x.add_argument("--latency-time", type=_float_in("latency_time", *LATENCY_TIME_RANGE), default=0.5,
                   help="with --dense: each model is timed 3 x this many seconds over 7 rounds (default: 0.5; range "
                   "%g..%g seconds)" % LATENCY_TIME_RANGE)
    x.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file, or in an --out folder the files of the names export writes")

    demo = sub.add_parser("demo", help="compress the embedded Shapes CLIP 2x and print before/after")
    demo.add_argument("--out", default="upop-demo", help="folder for the data and the run (default: upop-demo)")
    demo.add_argument("--no-progress", action="store_true")
    return parser


def _version() -> str:
    from upop._version import __version__

    return __version__
