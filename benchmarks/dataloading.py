"""Training throughput with DataLoader workers (``--workers``): the same batches, read, decoded and
collated in the training process or ahead of time by worker processes.

    python benchmarks/dataloading.py            # 224 px Shapes PNGs, small CLIP, workers 0/1/2
    python benchmarks/dataloading.py --quick

Each setting runs the same training steps (forward, backward, AdamW) of a CLIP on Shapes retrieval
data stored as PNG files, with the batches of ``upop.engine.run.step_batches``; the table gives the
median seconds per step and the speedup over ``workers=0`` measured in the same run. One torch
compute thread, so on a 2-core machine one worker has a core of its own.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

import upop  # noqa: E402
import upop.models.folders
from upop.data.shapes import write_retrieval  # noqa: E402
from upop.tasks import get_task  # noqa: E402
from upop.engine.run import step_batches  # noqa: E402


def seconds_per_step(model, task, train, collate, batch: int, steps: int, workers: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    times, last = [], None
    for i, b in enumerate(step_batches(train, collate, batch_size=batch, seed=0, start=0, stop=steps + 2,
                                       workers=workers)):
        task.loss(model, b).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        now = time.perf_counter()
        if i >= 2:  # the first steps include the workers' start-up
            times.append(now - last)
        last = now
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    image_size, batch, steps, size = (64, 8, 4, "tiny") if args.quick else (224, 32, 12, "small")
    task = get_task("retrieval")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        write_retrieval(work / "data", train=batch * (steps + 2), val=4, test=4, image_size=image_size, seed=0)
        upop.models.folders.make_model_folder("clip", work / "model", size=size, image_size=image_size)
        model, processor = upop.load_model(work / "model")
        model.train()
        train = task.load_splits(work / "data", splits=("train",))["train"]
        collate = task.collator(processor)
        for workers in (0, 1, 2):
            s = seconds_per_step(model, task, train, collate, batch, steps, workers)
            rows.append({"workers": workers, "seconds_per_step": s})
            print(rows[-1], flush=True)
    base = rows[0]["seconds_per_step"]
    for r in rows:
        r["speedup"] = base / r["seconds_per_step"]
    table = ["| workers | s / step | speedup vs 0 |", "|---:|---:|---:|"]
    table += [f"| {r['workers']} | {r['seconds_per_step']:.3f} | {r['speedup']:.2f}x |" for r in rows]
    text = "\n".join(table)
    print(text)
    setup = (f"CLIP {size} at {image_size} px, batch {batch}, PNG images decoded and processed by the CLIP "
             f"processor every step, {steps} steps timed per setting, 1 compute thread")
    write_results("dataloading" + ("-quick" if args.quick else ""), {"rows": rows, "setup": setup},
                  f"## Training throughput with DataLoader workers\n\n{setup}.\n\n{text}")


if __name__ == "__main__":
    main()
