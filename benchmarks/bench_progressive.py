"""Progressive rendering benchmark: a 2048x2048 region of a real slide decoded from 1, 2, ... flow levels.

Packs a 2048x2048 tissue region of the real JPEG 2000 SVS (as a one-level TIFF) with each model,
then reads the region back from each number of flow levels: bytes read from the shard files,
read + decode time, and PSNR against the original. Saves a picture strip (one 384x384 crop per
level count, then the original), like the IDF paper's progressive figure.

    python benchmarks/bench_progressive.py --out results
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image, ImageDraw

from wsi_idf.model.data import data_dir
from wsi_idf.jobs.pack import pack_slide
from wsi_idf.archive.progressive import read_region
from wsi_idf.coding.registry import MODELS
from wsi_idf.slide import open_slide

SIDE = 2048


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=sorted(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    slide_path = data_dir() / "slides" / "tcga-cr-7395-01a-01-ts1.svs"
    if not slide_path.exists():
        print(f"bench: {slide_path} not found (set WSI_IDF_DATA)", file=sys.stderr)
        return 1
    original = open_slide(slide_path).read(0, 1200, 1200 + SIDE, 1800, 1800 + SIDE)
    work = Path(tempfile.mkdtemp(prefix="wsi-idf-progressive-"))
    source = work / "region.tif"
    tifffile.imwrite(source, original, tile=(256, 256), photometric="rgb", compression="zlib")
    rows, strip = [], []
    crop = (slice(800, 1184), slice(800, 1184))
    for model in args.models:
        archive = work / f"{model}.zarr"
        pack_slide(source, archive, model=model, scheduler="synchronous")
        levels = MODELS[model].config.levels
        for k in range(1, levels + 1):
            t0 = time.perf_counter()
            pixels, nbytes = read_region(archive, 0, 0, 0, SIDE, SIDE, flow_levels=k)
            seconds = time.perf_counter() - t0
            quality = psnr(pixels, original)
            rows.append({"model": model, "levels": k, "bytes_read": nbytes, "bits_per_subpixel": 8 * nbytes / original.size,
                         "seconds": round(seconds, 2), "psnr_db": None if quality == float("inf") else round(quality, 2),
                         "lossless": bool(np.array_equal(pixels, original))})
            print(json.dumps(rows[-1]), flush=True)
            if model == args.models[0]:
                strip.append((f"{k} of {levels} levels, {nbytes / 1e6:.2f} MB, "
                              + ("lossless" if rows[-1]["lossless"] else f"{quality:.1f} dB"), pixels[crop]))
    strip.append(("original", original[crop]))
    full = {r["model"]: r["bytes_read"] for r in rows if r["lossless"]}
    lines = [f"Progressive reads of a {SIDE}x{SIDE} region of {slide_path.name} (level 0), {args.threads} threads", "",
             "| model | flow levels read | bytes read | share of full | bits/sub-pixel | read + decode s | PSNR dB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['levels']} | {r['bytes_read']:,} | {r['bytes_read'] / full[r['model']]:.0%} | "
                     f"{r['bits_per_subpixel']:.3f} | {r['seconds']} | {'lossless' if r['lossless'] else r['psnr_db']} |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_progressive.md").write_text(text)
    (args.out / "bench_progressive.json").write_text(json.dumps(rows, indent=2))
    tile = 384
    canvas = Image.new("RGB", (len(strip) * (tile + 8), tile + 24), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (label, image) in enumerate(strip):
        canvas.paste(Image.fromarray(image), (i * (tile + 8), 22))
        draw.text((i * (tile + 8) + 2, 4), label, fill="black")
    canvas.save(args.out / "progressive_strip.png")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
