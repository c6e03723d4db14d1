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

import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from upop.config import UPopConfig, check_tracker, config_fields
from upop.errors import ConfigError, UPopError

from upop.cli.parser import EXIT_USER_ERROR, build_parser  # noqa: F401 (build_parser: public)


def _config_from_args(args) -> UPopConfig:
    base = UPopConfig.from_yaml(args.config).to_dict() if args.config else {}
    for name, *_ in config_fields():
        value = getattr(args, name, None)
        if value is not None:
            base[name] = value
    return UPopConfig.from_dict(base, source="options")


def cmd_compress(args) -> int:
    from upop.api import compress
    from upop.models.folders import load_any

    from upop.tasks import get_task

    config = _config_from_args(args)
    check_tracker(config.report_to)  # a missing tracker package before anything is loaded
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
    from upop.api import evaluate
    from upop.measure.latency import time_models

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
    from upop.data import check_shapes_sizes, write_shapes
    from upop.errors import DataError, show

    if args.source == "check":
        from upop.data.check import check_data

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
    check_shapes_sizes(args.task, args.train, args.val, args.test)  # before anything is written
    info = _write_owned(Path(args.out), "data", SHAPES_FILES, args.overwrite, lambda: write_shapes(
        args.task, args.out, train=args.train, val=args.val, test=args.test, image_size=args.image_size,
        seed=args.seed))
    print(f"{'reused' if info.get('reused') else 'wrote'} Shapes {args.task} data in {args.out}: "
          + ", ".join(f"{s} {v['documents']} documents" if "documents" in v else f"{s} {v['images']} images"
                      for s, v in info["splits"].items()))
    return 0


#: what ``data shapes`` writes, for every task's format
SHAPES_FILES = ("images", "texts.txt", "annotations", "train", "val", "test", "train.json", "val.json", "test.json",
                "train.jsonl", "val.jsonl", "test.jsonl", "shapes.json", "classes.json")

#: what ``make-model`` writes (a model folder holding anything else is never overwritten)
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "processor_config.json",
               "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.json")


def _write_owned(out: Path, kind: str, files, overwrite: bool, write):
    """Run ``write()`` into ``out`` under the run-folder rules: a non-empty folder needs
    ``overwrite`` and may hold only what this command writes; the previous files are set aside
    and come back if ``write`` fails."""
    from upop.runs.rundir import RunDir

    rundir = RunDir(out, kind=kind, files=files)
    rundir.create()
    try:
        with rundir.lock():
            rundir.clean_temp()  # a killed write's temps first: they are upop's, not files to refuse over
            rundir.check_overwrite(False, overwrite)
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
    from upop.models.folders import make_model_folder
    from upop.measure.cost import count_params

    model = _write_owned(Path(args.out), "model", MODEL_FILES, args.overwrite, lambda: make_model_folder(
        args.family, args.out, size=args.size, image_size=args.image_size, seed=args.seed,
        num_labels=args.num_labels)[0])
    print(f"wrote a random {args.size} {args.family} ({type(model).__name__}, {count_params(model):,} params) to {args.out}")
    return 0


def cmd_import(args) -> int:
    from upop.measure.cost import count_params
    from upop.models.importers import import_blip_nlvr
    from upop.models.importers_blip import IMPORTERS

    from upop.runs.rundir import check_out_dir

    importer = {"blip-nlvr": import_blip_nlvr, **IMPORTERS}[args.source]
    check_out_dir(args.out, {"checkpoint": args.checkpoint, "tokenizer folder": args.tokenizer})
    model = _write_owned(Path(args.out), "model", MODEL_FILES, args.overwrite,
                         lambda: importer(args.checkpoint, args.out, tokenizer=args.tokenizer))
    print(f"imported {args.checkpoint} as {type(model).__name__} ({count_params(model):,} params) to {args.out}")
    if args.tokenizer is None:
        print("upop: the folder has no tokenizer; rerun with --tokenizer DIR (bert-base-uncased's vocab.txt and "
              "tokenizer_config.json) to add BLIP's ([DEC] and [ENC] are added)", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    from upop.export.onnx import export_onnx

    result = export_onnx(args.model, args.out, part=args.part, dense=args.dense, batch=args.batch, opset=args.opset,
                         tolerance=args.tolerance, overwrite=args.overwrite, exporter=args.exporter,
                         latency_time=args.latency_time, pooling=args.pooling, format=args.format)
    print(result.summary())
    return 0


def cmd_demo(args) -> int:
    from upop.cli.demo import run_demo

    return run_demo(Path(args.out), progress=not args.no_progress)


def _summary(report: dict, out: Path) -> str:
    from upop.runs.report import NOISE_LIMIT, markdown

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


class _Stdout(logging.Handler):
    """Prints each message of the ``upop`` logger as a line on the current ``sys.stdout`` (looked up
    at each message, so a redirected or captured stdout receives it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), flush=True)
        except Exception:  # noqa: BLE001 (logging's rule: a failing handler reports, never raises)
            self.handleError(record)


@contextlib.contextmanager
def _print_log():
    """While a command runs, the ``upop`` logger's messages (INFO and above) are printed to stdout,
    as the command line always printed them; its level and handlers are restored afterwards."""
    logger = logging.getLogger("upop")
    handler, level = _Stdout(logging.INFO), logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _run(args) -> int:
    from upop.engine.run import RunStopped, TrainingError

    try:
        with _print_log():
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
    except OSError as exc:
        from upop.errors import show
        from upop.engine.runtime import is_disk_full

        if not is_disk_full(exc):
            raise
        # a full disk in a write the run does not name itself (its own are TrainingErrors naming
        # the file); the writers are atomic, so what was there before is intact
        where = f" while writing {show(exc.filename)}" if exc.filename else ""
        _error(f"upop: error: no space left on device{where}; free some space and run the same command again "
               "(with --resume for upop compress)")
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or argparse's one-line refusal (already printed)
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else EXIT_USER_ERROR
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    # transformers' note that an image processor falls back to its PIL class without torchvision:
    # upop uses the PIL backend on purpose, and the note would stand beside upop's one-line errors
    import logging

    logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
    owned = not _group_exists()  # a process group the caller made is the caller's to end
    try:
        return _run_reported(args)
    finally:  # not reached after os._exit: a failed distributed run leaves without teardown
        if owned and _group_exists():
            import torch.distributed as dist

            dist.destroy_process_group()  # the one a run made (torchrun: Accelerate's, in compress)


def _group_exists() -> bool:
    """Whether a default process group exists (never imports torch: without it there is none)."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def _run_reported(args) -> int:
    """:func:`_run`, with a distributed run's unexpected errors reported once; a distributed run
    that failed leaves at once (``os._exit``)."""
    try:
        code = _run(args)
    except BaseException as exc:
        if not _distributed():
            raise
        from upop.engine.runtime import ddp_unused

        unused = ddp_unused(exc)
        if unused is not None:  # DDP's error outside a step's forward (the steps name the step): one line
            import torch.distributed as dist

            _error(f"upop: error: data parallelism failed on process {dist.get_rank()} of {dist.get_world_size()}: "
                   f"parameter(s) {', '.join(unused) or '(not named by torch)'} got no gradient in the previous "
                   "step; this is a bug, please report it")
        elif not _peer_lost(exc):  # a peer's failure is reported by that peer (and by the launcher)
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
