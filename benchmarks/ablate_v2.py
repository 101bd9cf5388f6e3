"""Same-budget ablations of model v2: each variant trains from scratch for the same CPU time on one
thread, then its EMA weights are scored on the same validation patches (float NLL, bits per sub-pixel).

    python benchmarks/ablate_v2.py --cpu-minutes 5 --out results        # every variant
    python benchmarks/ablate_v2.py baseline aligned8 --cpu-minutes 5

Prints a markdown table and writes it to results/ablate_v2.md; one seed, so differences under
~0.03 bits are within noise (see ../shared/notes/wavelet-flow.md for the prototype's curves).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from wsi_idf.config import WaveletConfig
from wsi_idf.model.data import data_dir, grid_patches, load_tiles
from wsi_idf.model.data import CropSource  # noqa: E402
from wsi_idf.model.training import TrainSettings, evaluate, train
from wsi_idf.model.wavelet_flow import WaveletIDF

BASE = WaveletConfig(levels=3, width=32, blocks=1, prior_width=32, prior_blocks=1, context_width=0)
VARIANTS: dict[str, tuple[WaveletConfig, dict, str]] = {
    "baseline": (BASE, {}, "V2: 3 levels, couplings and priors width 32, float, EMA, random crops"),
    "context": (replace(BASE, context_width=32), {}, "checkerboard context in the split priors (width 32)"),
    "priors64x2": (replace(BASE, prior_width=64, prior_blocks=2), {}, "capacity in the priors: width 64, 2 blocks"),
    "couplings48": (replace(BASE, width=48), {}, "capacity in the couplings: width 48"),
    "levels4": (replace(BASE, levels=4), {}, "4 levels (smaller top)"),
    "aligned8": (BASE, {"align": 8}, "training crops on the 8x8 JPEG grid"),
    "qat": (BASE, {"quantize_from": 0}, "quantization-aware from the start (instead of float)"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", help=f"any of {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--cpu-minutes", type=float, default=5.0)
    parser.add_argument("--val", type=int, default=256, help="validation patches (evenly spaced)")
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    torch.set_num_threads(1)
    tiles = load_tiles(data_dir() / "tiles" / "train")
    val = grid_patches(load_tiles(data_dir() / "tiles" / "val"))
    val = np.ascontiguousarray(val[np.linspace(0, len(val) - 1, args.val).astype(int)])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.variants or list(VARIANTS):
        config, overrides, what = VARIANTS[name]
        torch.manual_seed(0)
        settings = TrainSettings(**{"steps": 10**9, "eval_every": 10**9, "cpu_limit_s": args.cpu_minutes * 60,
                                    "quantize_from": 10**9, **overrides})
        records: list[dict] = []
        model = train(WaveletIDF(config), CropSource(tiles), val, settings, log=records.append)
        results[name] = {"what": what, "steps": records[-1]["step"], "val_bpsp": evaluate(model, val),
                         "params": sum(p.numel() for p in model.parameters())}
        print(json.dumps({name: results[name]}), flush=True)
    lines = [f"Same budget: {args.cpu_minutes:g} CPU-minutes on one thread from scratch, batch 32, {len(val)} val "
             "patches, EMA weights, float NLL", "", "| variant | what | parameters | steps | val bits/sub-pixel |",
             "|---|---|---|---|---|"]
    lines += [f"| {n} | {r['what']} | {r['params']:,} | {r['steps']} | {r['val_bpsp']:.3f} |" for n, r in results.items()]
    table = "\n".join(lines)
    print(table)
    (out / "ablate_v2.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
