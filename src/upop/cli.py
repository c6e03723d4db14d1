"""The ``upop`` command line: a thin layer over the Python API.

    upop compress --model PATH --task retrieval --data DIR --ratio 0.5 --out DIR
    upop evaluate --model DIR --task retrieval --data DIR
    upop data shapes --task retrieval --out DIR
    upop make-model clip --out DIR
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


def _type_for(name: str, default):
    if name in ("retrain_lr", "max_grad_norm"):
        return float
    if name in ("interval", "workers"):
        return int
    return type(default) if default is not None else str


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("UPop settings (also settable in --config YAML; the command line wins)")
    for name, default, help_text, choices in config_fields():
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
    c.add_argument("--task", required=True, choices=sorted(TASKS), help="task the model is fine-tuned for")
    c.add_argument("--data", required=True, help="dataset folder in the task's format (see docs/data.md)")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--config", help="YAML file of UPop settings")
    c.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    c.add_argument("--overwrite", action="store_true", help="replace a previous run in --out")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_config_options(c)

    e = sub.add_parser("evaluate", help="print a model's metrics on a dataset split as JSON")
    e.add_argument("--model", required=True, help="compressed (upop) or dense Hugging Face model folder")
    e.add_argument("--task", required=True, choices=sorted(TASKS))
    e.add_argument("--data", required=True, help="dataset folder")
    e.add_argument("--split", default="test", help="split to evaluate (default: test)")
    e.add_argument("--batch-size", type=int, default=64)

    d = sub.add_parser("data", help="write a synthetic dataset in the real formats")
    d.add_argument("source", choices=["shapes"], help="generator (shapes: the Shapes world)")
    d.add_argument("--task", required=True, choices=sorted(WRITERS), help="dataset format to write")
    d.add_argument("--out", required=True)
    d.add_argument("--train", type=int, default=2000)
    d.add_argument("--val", type=int, default=200)
    d.add_argument("--test", type=int, default=200)
    d.add_argument("--image-size", type=int, default=64)
    d.add_argument("--seed", type=int, default=0)

    m = sub.add_parser("make-model", help="write a randomly initialised model with the Shapes tokenizer")
    m.add_argument("family", choices=FAMILIES, help="model family")
    m.add_argument("--out", required=True)
    m.add_argument("--size", default="tiny", choices=["tiny", "small", "base"])
    m.add_argument("--image-size", type=int, default=64)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--num-labels", type=int, default=None,
                   help="classes of a classifier / segmenter (default: those of the Shapes data set of its task)")

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
    splits = get_task(args.task).load_splits(args.data)  # cheap checks first: bad data fails fast
    model, processor = load_any(args.model)
    if processor is None:
        raise ConfigError(f"model folder {args.model} has no tokenizer/processor files; save them next to the model")
    result = compress(model, args.task, train=splits["train"], val=splits["val"], test=splits["test"], processor=processor, config=config, out_dir=args.out,
                      resume=args.resume, overwrite=args.overwrite, base_model=str(args.model),
                      progress=not args.no_progress)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(_summary(result.report, Path(args.out)))
    return 0


def cmd_evaluate(args) -> int:
    from .api import evaluate

    metrics = evaluate(args.model, args.task, args.data, split=args.split, batch_size=args.batch_size)
    print(json.dumps(metrics, indent=1, sort_keys=True))
    return 0


def cmd_data(args) -> int:
    from .data import shapes_writer

    info = shapes_writer(args.task)(args.out, train=args.train, val=args.val, test=args.test, image_size=args.image_size,
                           seed=args.seed)
    print(f"{'reused' if info.get('reused') else 'wrote'} Shapes {args.task} data in {args.out}: "
          + ", ".join(f"{s} {v['images']} images" for s, v in info["splits"].items()))
    return 0


def cmd_make_model(args) -> int:
    from .models import make_model_folder
    from .cost import count_params

    model, _ = make_model_folder(args.family, args.out, size=args.size, image_size=args.image_size, seed=args.seed,
                                 num_labels=args.num_labels)
    print(f"wrote a random {args.size} {args.family} ({type(model).__name__}, {count_params(model):,} params) to {args.out}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(Path(args.out), progress=not args.no_progress)


def _summary(report: dict, out: Path) -> str:
    from .report import markdown

    return markdown(report) + f"\nReport: {out / 'report.md'}\nCompressed model: {out / 'compressed'}\n"


COMMANDS = {"compress": cmd_compress, "evaluate": cmd_evaluate, "data": cmd_data, "make-model": cmd_make_model,
            "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    from .train import TrainingError

    try:
        return COMMANDS[args.command](args)
    except TrainingError as exc:
        print(f"upop: error: {exc}", file=sys.stderr)
        return 1
    except UPopError as exc:
        print(f"upop: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("upop: interrupted; continue with the same command and --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
