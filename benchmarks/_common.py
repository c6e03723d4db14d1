"""Shared helpers of the benchmarks: machine info, result files, full-size configs."""

from __future__ import annotations

import json
import os
import shlex
import platform
import sys
import time
from pathlib import Path

import torch

# UPOP_BENCH_RESULTS redirects the output (the test of the --quick variants writes to a temp folder)
RESULTS = Path(os.environ.get("UPOP_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def machine() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def write_results(name: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    """Write ``results/NAME.json`` and ``results/NAME.md`` (command and machine included)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = "python " + shlex.join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    payload = {"command": command, "machine": machine(), "date": time.strftime("%Y-%m-%d"), **payload}
    js, md = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    js.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    m = payload["machine"]
    footer = (f"\nCommand: `{command}` — machine: {m['cpu_count']} CPU cores ({m['processor']}), "
              f"torch {m['torch']}, {m['torch_threads']} threads{', ' + m['cuda'] if m['cuda'] else ''}; {payload['date']}.\n")
    md.write_text(markdown.rstrip() + "\n" + footer)
    return js, md


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (VmHWM), in MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def clip_b16_config(image_size: int = 224):
    """CLIP ViT-B/16 sizes (vision 768 x 12, text 512 x 12), random weights."""
    import transformers

    return transformers.CLIPConfig(
        text_config=dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048,
                         max_position_embeddings=77, vocab_size=49408, eos_token_id=49407, bos_token_id=49406),
        vision_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                           image_size=image_size, patch_size=16),
        projection_dim=512,
    )


def blip_base_config(image_size: int = 224):
    """BLIP-base sizes (ViT-B/16 vision, BERT-base text), random weights."""
    import transformers

    return transformers.BlipConfig(
        vision_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                           image_size=image_size, patch_size=16),
        text_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                         encoder_hidden_size=768, vocab_size=30524, max_position_embeddings=512),
        image_text_hidden_size=256, projection_dim=512,
    )


def task_bench_args(description: str, tasks, quick_help: str, argv=None):
    """The options of a per-task quality benchmark (``--quick --work --tasks --threads``), parsed;
    the torch thread count is set."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--work", default=None, help="folder for data and runs (default: a temporary folder)")
    parser.add_argument("--tasks", nargs="+", default=list(tasks), choices=list(tasks))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine more threads contend and run slower)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args


def report_cells(side: dict) -> dict:
    """Metrics (rounded), params, FLOPs and latency of one side (dense or compressed) of a report."""
    return {"metrics": {k: round(v, 2) for k, v in side["metrics"].items()}, "params": side["params"],
            "flops": side["flops"], "latency_ms": round(side["latency_ms"], 3)}

