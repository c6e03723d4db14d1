"""Train the embedded demo model: a small CLIP on the Shapes world retrieval data.

    python scripts/train_demo_model.py [--out src/upop/assets/demo-clip] [--epochs 10]

Reproducible (seeded data, initialisation and data order). The result is shipped with the
package and is what ``upop demo`` compresses.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from upop.data.shapes import write_retrieval
from upop.models.folders import make_model_folder, load_any
from upop.tasks import get_task
from upop.engine.run import finetune

from upop.cli.demo import DEMO_DATA


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="src/upop/assets/demo-clip")
    parser.add_argument("--data", default="runs/shapes-retrieval")
    parser.add_argument("--size", default="small")
    # an epoch is one pass over the image-caption pairs (2 per Shapes image); the shipped model was
    # trained when an epoch was one pass over the images, for 20 epochs: the same number of steps
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    write_retrieval(args.data, **DEMO_DATA)
    start = time.time()
    make_model_folder("clip", args.out, size=args.size, image_size=DEMO_DATA["image_size"], seed=args.seed)
    model, processor = load_any(args.out)
    task = get_task("retrieval")
    splits = task.load_splits(args.data)
    model, val = finetune(model, task, splits["train"], splits["val"], processor, epochs=args.epochs, lr=args.lr,
                          batch_size=args.batch_size, seed=args.seed, warmup_steps=100)
    test = task.evaluate(model, splits["test"], processor)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    info = {"data": DEMO_DATA, "size": args.size, "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
            "seed": args.seed, "val": val, "test": test, "train_seconds": round(time.time() - start, 1),
            "command": "python scripts/train_demo_model.py"}
    (Path(args.out) / "training.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
