"""Train (or continue, or fine-tune) registered models, here or as tasks on a Dask cluster.

    python pipelines/train_models.py fast --minutes 60 --out training/        # continues training/fast.ckpt
    python pipelines/train_models.py fast --device cuda --scheduler tcp://gpu-node:8786 --out /shared/ckpt
    python pipelines/train_models.py fast --init-from wsi_idf/weights/fast-e02fec51.safetensors \\
        --data /lab/slides --out finetuned/

Each model trains with ``wsi_idf.model.training.train_model``: resumable checkpoints (run again to
continue), a JSON-lines log of train and validation bits per sub-pixel, and an exported coding
model proved to round-trip exactly. On a cluster each model is one task; with ``--device cuda``
it asks for a worker with the resource ``GPU=1``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from wsi_idf.model.data import data_dir
from wsi_idf.coding.registry import MODELS
from wsi_idf.model.training import CANDIDATES, TrainSettings, train_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", choices=sorted({*MODELS, *CANDIDATES}))
    parser.add_argument("--data", action="append", type=Path, default=None, help="tiles/slides (repeatable)")
    parser.add_argument("--val", action="append", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=100000)
    parser.add_argument("--minutes", type=float, default=None, help="stop after this long (checkpointed)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("checkpoints"))
    parser.add_argument("--init-from", type=Path, default=None, help="a model file to continue or fine-tune")
    parser.add_argument("--grow-from", type=Path, default=None,
                        help="a smaller model file that a new run starts as (added capacity starts as no change)")
    parser.add_argument("--export-only", action="store_true", help="export the checkpoint as it is, no training")
    parser.add_argument("--no-export", action="store_true", help="train and checkpoint only")
    parser.add_argument("--quantize-from", type=int, default=0,
                        help="step from which training is quantization-aware (float before it)")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--zoom", type=float, default=0.0, help="share of crops at half resolution (2x2 means)")
    parser.add_argument("--scheduler", default=None, help="run each model as a task on this Dask cluster")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    settings = TrainSettings(steps=0 if args.export_only else args.steps, batch_size=args.batch_size, lr=args.lr,
                             eval_every=args.eval_every, quantize_from=args.quantize_from, zoom=args.zoom,
                             time_limit_s=args.minutes * 60 if args.minutes else None)
    data = args.data or [data_dir() / "tiles" / "train"]
    val = args.val or [data_dir() / "tiles" / "val"]
    jobs = [dict(name=name, data=data, out=args.out, val=val, settings=settings, init_from=args.init_from,
                 grow_from=args.grow_from,
                 device=args.device, export=not args.no_export) for name in args.models]
    if args.scheduler:
        from distributed import Client
        with Client(args.scheduler) as client:
            resources = {"GPU": 1} if args.device.startswith("cuda") else None
            results = client.gather([client.submit(train_model, pure=False, resources=resources, **job)
                                     for job in jobs])
    else:
        results = [train_model(**job) for job in jobs]
    for result in results:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
