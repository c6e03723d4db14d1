"""``upop demo``: the main job on the embedded default.

Generates (or reuses) the Shapes retrieval data, compresses the shipped Shapes CLIP 2x with UPop,
retrains, evaluates on the held-out test split and prints a before/after table. The shipped model
was trained by ``scripts/train_demo_model.py`` on the same data settings (:data:`DEMO_DATA`).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from upop.config import UPopConfig

#: the Shapes retrieval data of the demo (the demo model was trained on its train split)
DEMO_DATA = dict(train=4000, val=200, test=500, image_size=64, seed=0)

#: the demo's UPop settings: 2x, a short search and retraining that fit in a few CPU minutes (an epoch
#: is 8,000 image-caption pairs: 2 captions of each of the 4,000 training images)
DEMO_CONFIG = dict(ratio=0.5, search_epochs=2, retrain_epochs=3, batch_size=64, lr=1e-4, retrain_lr=5e-4,
                   checkpoint_every=100, seed=0, latency_batch_size=32)


def demo_model_path() -> Path:
    return Path(str(resources.files("upop") / "assets" / "demo-clip"))


def run_demo(out: Path, progress: bool = True) -> int:
    from upop.api import compress
    from upop.data.shapes import write_retrieval
    from upop.models.folders import load_any

    model_dir = demo_model_path()
    if not (model_dir / "model.safetensors").is_file():
        from upop.errors import ConfigError

        raise ConfigError(f"the demo model is missing from {model_dir}; reinstall upop or run scripts/train_demo_model.py")
    data = out / "data"
    print(f"Shapes retrieval data: {data} ({DEMO_DATA['train']} train / {DEMO_DATA['val']} val / "
          f"{DEMO_DATA['test']} test images)")
    write_retrieval(data, **DEMO_DATA)
    model, processor = load_any(model_dir)
    config = UPopConfig(**DEMO_CONFIG)
    print(f"Compressing the demo CLIP ({model_dir}) {1 / (1 - config.ratio):.0f}x with UPop: "
          f"{config.search_epochs} search + {config.retrain_epochs} retrain epochs")
    result = compress(model, "retrieval", data, processor=processor, config=config, out_dir=out / "run",
                      overwrite=True, base_model=str(model_dir), progress=progress)
    print(table(result.report))
    print(f"Report: {out / 'run' / 'report.md'}  (JSON: report.json, plot: allocation.png)")
    print(f"Compressed model: {out / 'run' / 'compressed'}  (load with upop.load_compressed)")
    return 0


def table(report: dict) -> str:
    from upop.runs.report import speedup_words

    d, c = report["dense"], report["compressed"]
    rows = [("test R-mean", f"{d['metrics']['r_mean']:.2f}", f"{c['metrics']['r_mean']:.2f}",
             f"{c['metrics']['r_mean'] / d['metrics']['r_mean']:.1%} of dense"),
            ("text R@1", f"{d['metrics']['txt_r1']:.2f}", f"{c['metrics']['txt_r1']:.2f}", ""),
            ("image R@1", f"{d['metrics']['img_r1']:.2f}", f"{c['metrics']['img_r1']:.2f}", ""),
            ("params", f"{d['params']:,}", f"{c['params']:,}", f"{d['params'] / c['params']:.2f}x smaller"),
            ("FLOPs", f"{d['flops']:,}", f"{c['flops']:,}", f"{d['flops'] / c['flops']:.2f}x fewer"),
            ("latency (ms)", f"{d['latency_ms']:.2f}", f"{c['latency_ms']:.2f}", speedup_words(report["speedup"]))]
    widths = [max(len(r[i]) for r in rows + [("", "dense", "compressed", "")]) for i in range(4)]
    line = lambda r: "  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths)))
    out = [line(("", "dense", "compressed", "")), *map(line, rows)]
    out.append(f"achieved ratio {report['achieved_ratio']:.4f} of prunable {report['cost']} "
               f"(target {report['target_ratio']}); {report['latency_input']}")
    spread = report.get("speedup_spread")
    if spread:
        out.append(f"per-round speedups {spread['min']:.2f}-{spread['max']:.2f}x"
                   + ("; the machine was noisy, the speedup is uncertain: re-time with "
                      f"{report['latency']['retime_command']}" if report.get("latency_noisy") else ""))
    return "\n".join(out)
