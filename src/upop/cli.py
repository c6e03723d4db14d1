"""The ``upop`` command line: a thin layer over the Python API.

    upop compress --model PATH --task retrieval --data DIR --ratio 0.5 --out DIR
    upop evaluate --model DIR --task retrieval --data DIR
    upop data shapes --task retrieval --out DIR
    upop make-model clip --out DIR
    upop import blip-nlvr model_base_nlvr.pth --out DIR   (also blip-retrieval, blip-vqa, blip-caption)
    upop export --model DIR --format onnx --out model.onnx [--dense DENSE_DIR]
    upop demo

User mistakes print one line ``upop: error: ...`` and exit with code 2 (no traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import UPopConfig, config_fields
from .errors import ConfigError, UPopError

EXIT_USER_ERROR = 2


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"need true or false, got {text!r}")


def _round_to(text: str):
    """``--round-to``: auto or an integer."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"need auto or an integer >= 1, got {text!r}") from None


def _type_for(name: str, default):
    if name == "round_to":
        return _round_to
    if isinstance(default, bool):
        return _bool
    if name in ("retrain_lr", "max_grad_norm"):
        return float
    if name in ("interval", "workers", "itm_k"):
        return int
    return type(default) if default is not None else str


def _add_config_options(parser: argparse.ArgumentParser, task_only: bool = False) -> None:
    group = parser.add_argument_group("task settings" if task_only else
                                      "UPop settings (also settable in --config YAML; the command line wins)")
    for name, default, help_text, choices in config_fields(task_only):
        flag = "--" + name.replace("_", "-")
        kwargs = dict(dest=name, default=None, help=f"{help_text} (default: {default})".replace("%", "%%"))
        if choices:
            kwargs["choices"] = choices
        else:
            kwargs["type"] = _type_for(name, default)
        group.add_argument(flag, **kwargs)


def _config_from_args(args) -> UPopConfig:
    base = UPopConfig.from_yaml(args.config).to_dict() if args.config else {}
    for name, *_ in config_fields():
        value = getattr(args, name, None)
        if value is not None:
            base[name] = value
    return UPopConfig.from_dict(base, source="options")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``upop: error: ...`` and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"upop: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    from .data import WRITERS
    from .models import FAMILIES
    from .tasks import TASKS

    parser = _Parser(prog="upop", description="Compress Hugging Face vision-language and vision "
                                     "transformers with Unified and Progressive Pruning (UPop).")
    parser.add_argument("--version", action="version", version=f"upop {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    c = sub.add_parser("compress", help="search, prune and retrain a model; write the checkpoint and a report",
                       description="Search which units to prune (UPop), slice them out, retrain, and write "
                       "OUT/compressed (a checkpoint folder), OUT/report.json|md, OUT/allocation.png and logs.")
    c.add_argument("--model", required=True, help="dense model: a local Hugging Face folder (or hub id)")
    c.add_argument("--task", required=True, choices=sorted(TASKS),
                   help="task the model is fine-tuned for; distill: label-free (a folder of images and/or texts.txt; "
                   "the compressed model learns to agree with the dense one)")
    c.add_argument("--data", required=True, help="dataset folder in the task's format (see docs/data.md)")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--config", help="YAML file of UPop settings")
    c.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint; refused if the model, data or a "
                   "setting that changes the result differs from the run's")
    c.add_argument("--restart-if-missing", action="store_true",
                   help="with --resume: start a new run if --out holds none (default: refuse)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace a previous upop run in --out (kept in OUT/.upop-previous until the new run "
                   "finished); a folder holding files upop did not write is never overwritten")
    c.add_argument("--check-images", choices=["header", "full", "none"], default="header",
                   help="before training, check every image of the data set: header (open and verify the "
                   "headers; fast), full (decode every image) or none (default: header)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_config_options(c)

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
    e.add_argument("--task", required=True, choices=sorted(TASKS))
    e.add_argument("--data", required=True, help="dataset folder")
    e.add_argument("--split", default="test", help="split to evaluate, or to take the timed samples from "
                   "(default: test)")
    e.add_argument("--batch-size", type=int, default=None, help="evaluation batch size (metrics; default: 64)")
    e.add_argument("--teacher", default=None, help="task distill only: the dense model folder the compressed model's "
                   "agreement is measured against")
    timing = e.add_argument_group("latency (with --latency only)")
    timing.add_argument("--latency", action="store_true",
                        help="time --model (and --baseline) instead of computing metrics")
    timing.add_argument("--baseline", help="a second model folder (e.g. the dense model) timed interleaved with "
                        "--model; the speedup is baseline latency / model latency")
    timing.add_argument("--latency-batch-size", type=int, default=None,
                        help="samples per timed forward (default: 1, as a run)")
    timing.add_argument("--latency-time", type=float, default=None,
                        help="each model is timed 3 x this many seconds in all, over 7 rounds (default: 0.5, as a run)")
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
    d.add_argument("--task", required=True, choices=sorted(WRITERS), help="dataset format")
    d.add_argument("--out", help="shapes: folder to write")
    d.add_argument("--data", help="check: dataset folder to check")
    d.add_argument("--images", choices=["header", "full"], default="header",
                   help="check: 'header' opens and verifies each image without decoding it (fast); 'full' "
                   "decodes every image as training will (default: header)")
    d.add_argument("--train", type=int, default=2000)
    d.add_argument("--val", type=int, default=200)
    d.add_argument("--test", type=int, default=200)
    d.add_argument("--image-size", type=int, default=64)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--overwrite", action="store_true",
                   help="shapes: replace a Shapes data set in --out (default: refuse a non-empty --out)")

    m = sub.add_parser("make-model", help="write a randomly initialised model with the Shapes tokenizer")
    m.add_argument("family", choices=FAMILIES, help="model family")
    m.add_argument("--out", required=True)
    m.add_argument("--size", default="tiny", choices=["tiny", "small", "base"])
    m.add_argument("--image-size", type=int, default=64)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--num-labels", type=int, default=None,
                   help="classes of a classifier / segmenter (default: those of the Shapes data set of its task)")
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

    x = sub.add_parser("export", help="export a model folder to ONNX, checked in ONNX Runtime (needs upop[onnx])",
                       description="Export --model (a compressed or dense folder) to the ONNX file --out with a dynamic "
                       "batch axis (and sequence axis for token inputs), then run it in ONNX Runtime at two batch sizes "
                       "and compare with PyTorch: a difference above --tolerance x max(1, max |output|) is refused and "
                       "nothing is written. With --dense, the dense model is exported too (to a temporary file) and "
                       "both are timed in ONNX Runtime in interleaved rounds (median latency and speedup).")
    x.add_argument("--model", required=True, help="compressed (upop) or dense Hugging Face model folder")
    x.add_argument("--format", choices=["onnx"], default="onnx", help="output format (default: onnx)")
    x.add_argument("--out", required=True, help="the .onnx file to write")
    x.add_argument("--part", choices=["vision", "text"], default=None,
                   help="CLIP / SigLIP: export one tower (vision: pixel_values -> image_embeds; text: input_ids, "
                   "attention_mask -> text_embeds); default: the whole model")
    x.add_argument("--dense", default=None, help="the dense model folder: time dense vs compressed in ONNX Runtime")
    x.add_argument("--batch", type=int, default=2, help="batch of the parity check (also checked at batch + 1) and "
                   "of the timing (default: 2)")
    x.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    x.add_argument("--tolerance", type=float, default=1e-3,
                   help="largest allowed |onnx - torch| as a fraction of max(1, max |output|) (default: 1e-3)")
    x.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"], default="auto",
                   help="auto: dynamo (torch.export), the TorchScript exporter if it fails (default: auto)")
    x.add_argument("--latency-time", type=float, default=0.5,
                   help="with --dense: each model is timed 3 x this many seconds over 7 rounds (default: 0.5)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    demo = sub.add_parser("demo", help="compress the embedded Shapes CLIP 2x and print before/after")
    demo.add_argument("--out", default="upop-demo", help="folder for the data and the run (default: upop-demo)")
    demo.add_argument("--no-progress", action="store_true")
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def cmd_compress(args) -> int:
    from .api import compress
    from .models import load_any

    from .tasks import get_task

    config = _config_from_args(args)
    get_task(args.task).configure(config).load_splits(args.data)  # cheap checks first: bad annotations fail fast
    model, processor = load_any(args.model)
    if processor is None:
        raise ConfigError(f"model folder {args.model} has no tokenizer/processor files; save them next to the model")
    result = compress(model, args.task, args.data, processor=processor, config=config, out_dir=args.out,
                      resume=args.resume, overwrite=args.overwrite, restart_if_missing=args.restart_if_missing,
                      check_images=args.check_images, base_model=str(args.model), progress=not args.no_progress)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(_summary(result.report, Path(args.out)))
    return 0


def cmd_evaluate(args) -> int:
    from .api import evaluate
    from .latency import time_models

    settings = {name: getattr(args, name) for name, *_ in config_fields(task_only=True) if getattr(args, name) is not None}
    config = UPopConfig.from_dict(settings, source="options")
    timing = {"--baseline": args.baseline, "--latency-batch-size": args.latency_batch_size,
              "--latency-time": args.latency_time, "--eval-precision": args.eval_precision, "--tf32": args.tf32}
    if not args.latency:
        given = [flag for flag, value in timing.items() if value is not None]
        if given:
            raise ConfigError(f"{given[0]} is an option of the timing; add --latency (upop evaluate --latency "
                              "--model DIR [--baseline DIR] ...)")
        metrics = evaluate(args.model, args.task, args.data, split=args.split,
                           batch_size=64 if args.batch_size is None else args.batch_size, config=config,
                           teacher=args.teacher)
        print(json.dumps(metrics, indent=1, sort_keys=True))
        return 0
    if args.batch_size is not None:
        raise ConfigError("--batch-size is the metrics' batch size; with --latency use --latency-batch-size")
    defaults = UPopConfig()
    result = time_models(args.model, args.baseline, task=args.task, data=args.data, split=args.split,
                         batch_size=defaults.latency_batch_size if args.latency_batch_size is None
                         else args.latency_batch_size,
                         seconds=defaults.latency_time if args.latency_time is None else args.latency_time,
                         precision=args.eval_precision or "fp32", tf32=args.tf32 is not False, config=config)
    print(json.dumps(result, indent=1, sort_keys=True))
    return 0


def cmd_data(args) -> int:
    from .data import shapes_writer
    from .errors import DataError, show

    if args.source == "check":
        from .data.check import check_data

        if not args.data or args.out:
            raise ConfigError("upop data check needs --data DIR (the folder to check) and writes nothing (no --out)")
        report = check_data(args.task, args.data, images=args.images)
        print("\n".join(report.summary() + report.problems), flush=True)
        if report.problems:
            count = len(report.problems)
            raise DataError(f"{count} problem{'s' if count > 1 else ''} in {show(args.data)}")
        print(f"no problems in {show(args.data)} ({args.task}, {args.images} check of the images)")
        return 0
    if not args.out or args.data:
        raise ConfigError("upop data shapes needs --out DIR (the folder to write) and reads no --data")
    info = _write_owned(Path(args.out), "data", SHAPES_FILES, args.overwrite, lambda: shapes_writer(args.task)(
        args.out, train=args.train, val=args.val, test=args.test, image_size=args.image_size, seed=args.seed))
    print(f"{'reused' if info.get('reused') else 'wrote'} Shapes {args.task} data in {args.out}: "
          + ", ".join(f"{s} {v['images']} images" for s, v in info["splits"].items()))
    return 0


#: what ``data shapes`` writes, for every task's format
SHAPES_FILES = ("images", "texts.txt", "annotations", "train", "val", "test", "train.json", "val.json", "test.json",
                "shapes.json", "classes.json")

#: what ``make-model`` writes (a model folder holding anything else is never overwritten)
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "processor_config.json",
               "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.json")


def _write_owned(out: Path, kind: str, files, overwrite: bool, write):
    """Run ``write()`` into ``out`` under the run-folder rules: a non-empty folder needs
    ``overwrite`` and may hold only what this command writes; the previous files are set aside
    and come back if ``write`` fails."""
    from .rundir import RunDir

    rundir = RunDir(out, kind=kind, files=files)
    rundir.create()
    try:
        with rundir.lock():
            rundir.check_overwrite(False, overwrite)
            rundir.clean_temp()
            if overwrite:
                rundir.set_aside_previous()
            try:
                result = write()
            except BaseException:
                rundir.restore_previous()
                raise
            rundir.drop_previous()
    except BaseException:
        rundir.discard_created()
        raise
    return result


def cmd_make_model(args) -> int:
    from .models import make_model_folder
    from .cost import count_params

    model = _write_owned(Path(args.out), "model", MODEL_FILES, args.overwrite, lambda: make_model_folder(
        args.family, args.out, size=args.size, image_size=args.image_size, seed=args.seed,
        num_labels=args.num_labels)[0])
    print(f"wrote a random {args.size} {args.family} ({type(model).__name__}, {count_params(model):,} params) to {args.out}")
    return 0


def cmd_import(args) -> int:
    from .cost import count_params
    from .importers import import_blip_nlvr
    from .importers_blip import IMPORTERS

    importer = {"blip-nlvr": import_blip_nlvr, **IMPORTERS}[args.source]
    model = _write_owned(Path(args.out), "model", MODEL_FILES, args.overwrite,
                         lambda: importer(args.checkpoint, args.out, tokenizer=args.tokenizer))
    print(f"imported {args.checkpoint} as {type(model).__name__} ({count_params(model):,} params) to {args.out}")
    if args.tokenizer is None:
        print("upop: the folder has no tokenizer; rerun with --tokenizer DIR (bert-base-uncased's vocab.txt and "
              "tokenizer_config.json) to add BLIP's ([DEC] and [ENC] are added)", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    from .export import export_onnx

    result = export_onnx(args.model, args.out, part=args.part, dense=args.dense, batch=args.batch, opset=args.opset,
                         tolerance=args.tolerance, overwrite=args.overwrite, exporter=args.exporter,
                         latency_time=args.latency_time)
    print(result.summary())
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(Path(args.out), progress=not args.no_progress)


def _summary(report: dict, out: Path) -> str:
    from .report import NOISE_LIMIT, markdown

    text = markdown(report) + f"\nReport: {out / 'report.md'}\nCompressed model: {out / 'compressed'}\n"
    if report.get("latency_noisy"):
        spread, latency = report["speedup_spread"], report["latency"]
        rel = spread["relative_iqr"]
        text += (f"upop: the machine was noisy while timing: per-round speedups {spread['min']:.2f}-{spread['max']:.2f}x, "
                 f"interquartile range {'undefined' if rel is None else f'{rel:.0%}'} of the median (limit "
                 f"{NOISE_LIMIT:.0%}); re-time on a quiet machine with: {latency['retime_command']}\n")
    return text


COMMANDS = {"compress": cmd_compress, "evaluate": cmd_evaluate, "data": cmd_data, "make-model": cmd_make_model,
            "demo": cmd_demo, "import": cmd_import, "export": cmd_export}


def printable(text: str) -> str:
    """``text`` with control characters (newline, NUL, escape sequences...) shown escaped, so a
    user value inside a message can neither cut the line nor drive the terminal."""
    return "".join(ch if ch.isprintable() or ch == " " else repr(ch)[1:-1] for ch in text)


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _error(message: str, exc: BaseException | None = None) -> None:
    """One line on stderr, on a line of its own, printed by one process (an error every process
    raised together is printed by the main process only)."""
    if exc is not None and getattr(exc, "shared", False) and not _is_main_process():
        return
    sys.stdout.flush()
    print(printable(message), file=sys.stderr, flush=True)


def _run(args) -> int:
    from .train import RunStopped, TrainingError

    try:
        return COMMANDS[args.command](args)
    except TrainingError as exc:
        _error(f"upop: error: {exc}", exc)
        return 1
    except UPopError as exc:
        _error(f"upop: error: {exc or type(exc).__name__}", exc)
        return EXIT_USER_ERROR
    except RunStopped as exc:
        _error(f"upop: {exc}", exc)
        _error("upop: continue with the same command and --resume", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        _error("upop: interrupted; continue with the same command and --resume")
        return 130


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        code = _run(args)
    except BaseException as exc:
        if not _distributed():
            raise
        if not _peer_lost(exc):  # a peer's failure is reported by that peer (and by the launcher)
            import traceback

            traceback.print_exc()
        code = 1
    if _distributed() and code != 0:
        # another process may be blocked in a collective: leave at once (no teardown that waits
        # for it); the launcher (torchrun, accelerate launch) then stops the others
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _peer_lost(exc: BaseException) -> bool:
    """True if ``exc`` says another process of the run went away (it reports its own error)."""
    import torch.distributed as dist

    text = str(exc)
    return isinstance(exc, getattr(dist, "DistBackendError", ())) or any(
        clue in text for clue in ("Connection closed by peer", "remote worker crashing", "Connection reset by peer"))


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
