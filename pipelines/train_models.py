"""Train registered models on real tiles and export their exact integer coding models.

    python pipelines/train_models.py fast --minutes 20 --out checkpoints/
    python pipelines/train_models.py fast --init-from wsi_idf/weights/fast-29461924.safetensors --out ft/
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from wsi_idf.data import data_dir, grid_patches, load_tiles
from wsi_idf.flow import IDF
from wsi_idf.model_file import export_model, load_float_model
from wsi_idf.registry import MODELS
from wsi_idf.training import TrainSettings, log_to, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--steps", type=int, default=100000)
    parser.add_argument("--minutes", type=float, default=None, help="stop after this long (checkpointed)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="checkpoints")
    parser.add_argument("--val-patches", type=int, default=128)
    parser.add_argument("--init-from", default=None,
                        help="start from the float weights of a model file (continue or fine-tune a shipped model)")
    parser.add_argument("--export-only", action="store_true", help="export the checkpoint as it is, no training")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    tiles = load_tiles(data_dir() / "tiles" / "train")
    val = grid_patches(load_tiles(data_dir() / "tiles" / "val"))[:: max(1, 648 // args.val_patches)]
    model = load_float_model(args.init_from) if args.init_from else IDF(MODELS[args.model].config)
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, eval_every=50,
                             time_limit_s=args.minutes * 60 if args.minutes else None)
    if args.export_only:
        settings.steps = 0
    train(model, tiles, val, settings, checkpoint=f"{args.out}/{args.model}.ckpt.safetensors", device=args.device,
          log=log_to(f"{args.out}/{args.model}.log.jsonl"))
    path = export_model(model.cpu(), args.out, args.model)
    print(f"exported {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
