"""Codec benchmark: wsi-idf models against classical lossless codecs on the same 80x80 patches.

Prints a markdown table (bits per sub-pixel of the bytes actually written, encode/decode
megapixels per second, ratios to JPEG XL e9) and saves it with a JSON copy under --out.
All codecs run in the same process on the same patches: compare ratios, not absolute
speeds (these machines are shared).

    python benchmarks/bench_codec.py --limit 648 --threads 2 --out results
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import imagecodecs
import numpy as np
import torch

from wsi_idf import decode_patches, encode_patches, ideal_bits
from wsi_idf.data import data_dir, grid_patches, load_tiles
from wsi_idf.model_file import load_float_model
from wsi_idf.registry import MODELS, get_model

CLASSICAL = {
    "JPEG XL e1": (lambda im: imagecodecs.jpegxl_encode(im, lossless=True, effort=1), imagecodecs.jpegxl_decode),
    "JPEG XL e7": (lambda im: imagecodecs.jpegxl_encode(im, lossless=True, effort=7), imagecodecs.jpegxl_decode),
    "JPEG XL e9": (lambda im: imagecodecs.jpegxl_encode(im, lossless=True, effort=9), imagecodecs.jpegxl_decode),
    "JPEG 2000": (lambda im: imagecodecs.jpeg2k_encode(im, level=0, reversible=True), imagecodecs.jpeg2k_decode),
    "WebP": (lambda im: imagecodecs.webp_encode(im, lossless=True), imagecodecs.webp_decode),
    "JPEG-LS": (lambda im: imagecodecs.jpegls_encode(im, level=0), imagecodecs.jpegls_decode),
    "PNG": (lambda im: imagecodecs.png_encode(im, level=9), imagecodecs.png_decode),
}


def bench_classical(name: str, patches_hwc: list[np.ndarray]) -> dict:
    encode, decode = CLASSICAL[name]
    t0 = time.perf_counter()
    blobs = [encode(p) for p in patches_hwc]
    t1 = time.perf_counter()
    decoded = [decode(b) for b in blobs]
    t2 = time.perf_counter()
    assert all(np.array_equal(d, p) for d, p in zip(decoded, patches_hwc)), f"{name} is not lossless here"
    return {"bytes": sum(map(len, blobs)), "encode_s": t1 - t0, "decode_s": t2 - t1}


def bench_model(name: str, patches: np.ndarray, batch_size: int) -> dict:
    model = get_model(name)
    encode_patches(patches[:2], model=name)  # warm-up: tables and caches
    t0 = time.perf_counter()
    blobs = encode_patches(patches, model=name, batch_size=batch_size)
    t1 = time.perf_counter()
    decoded = decode_patches(blobs, model=name, batch_size=batch_size)
    t2 = time.perf_counter()
    assert np.array_equal(decoded, patches), f"{name} is not lossless"
    nll_bits = float(sum(ideal_bits(patches[i:i + 64], model).sum() for i in range(0, len(patches), 64)))
    float_model = load_float_model(model.path).eval()
    with torch.no_grad():
        float_bits = float(sum(float_model(torch.from_numpy(patches[i:i + 64]))[0].sum()
                               for i in range(0, len(patches), 64)))
    return {"bytes": sum(map(len, blobs)), "encode_s": t1 - t0, "decode_s": t2 - t1, "nll_bits": nll_bits,
            "float_nll_bits": float_bits, "weights": model.path.name}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=648, help="number of val patches (648 = all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--models", nargs="*", default=sorted(MODELS))
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = data_dir() / "tiles" / "val"
    if not folder.is_dir():
        print(f"bench: no validation tiles at {folder} (set WSI_IDF_DATA)", file=sys.stderr)
        return 1
    all_patches = grid_patches(load_tiles(folder))
    patches = all_patches[np.linspace(0, len(all_patches) - 1, min(args.limit, len(all_patches))).astype(int)]
    hwc = [np.ascontiguousarray(p.transpose(1, 2, 0)) for p in patches]
    subpixels = patches.size
    mpx = len(patches) * 80 * 80 / 1e6
    rows = {}
    for name in args.models:
        rows[f"wsi-idf {name}"] = bench_model(name, patches, args.batch_size)
    for name in CLASSICAL:
        rows[name] = bench_classical(name, hwc)
    ref = rows["JPEG XL e9"]["bytes"]
    lines = [f"{len(patches)} patches of 80x80 from {folder} ({mpx:.2f} Mpx), torch threads {args.threads}, "
             f"{platform.processor() or platform.machine()}", "",
             "| codec | bits/sub-pixel | x JPEG XL e9 | encode Mpx/s | decode Mpx/s | model NLL bits/sub-pixel | "
             "bytes / NLL |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        bpsp = 8 * r["bytes"] / subpixels
        nll = f"{r['nll_bits'] / subpixels:.3f} (float {r['float_nll_bits'] / subpixels:.3f})" if "nll_bits" in r else ""
        ratio = f"{8 * r['bytes'] / r['nll_bits']:.4f}" if "nll_bits" in r else ""
        lines.append(f"| {name} | {bpsp:.3f} | {r['bytes'] / ref:.3f} | {mpx / r['encode_s']:.3f} | "
                     f"{mpx / r['decode_s']:.3f} | {nll} | {ratio} |")
        r.update(bits_per_subpixel=bpsp, encode_mpx_s=mpx / r["encode_s"], decode_mpx_s=mpx / r["decode_s"])
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_codec.md").write_text(table + "\n")
    (out / "bench_codec.json").write_text(json.dumps({"patches": len(patches), "threads": args.threads,
                                                       "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
