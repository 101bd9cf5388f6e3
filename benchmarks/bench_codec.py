"""Codec benchmark: wsi-idf models against classical lossless codecs on the same 80x80 patches.

Prints a markdown table (bits per sub-pixel of the bytes actually written, encode/decode
megapixels per second, ratios to JPEG XL e9 and to the best classical codec of the run, which
includes JPEG XL effort 10 and the best JPEG XL effort chosen per patch) and saves it with a
JSON copy under --out. ``--models`` takes registered names and model files (e.g. retired weights).
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

import wsi_idf  # noqa: F401  (before torch, as in the CLI and plain zarr: it sets OMP_WAIT_POLICY)
import imagecodecs
import numpy as np
import torch

from wsi_idf import decode_patches, encode_patches, ideal_bits
from wsi_idf.model.data import data_dir, grid_patches, load_tiles
from wsi_idf.model.export import load_float_model
from wsi_idf.coding.registry import MODELS, RETIRED, WEIGHTS_DIR, get_model

CLASSICAL = {
    "JPEG XL e1": (lambda im: imagecodecs.jpegxl_encode(im, lossless=True, effort=1), imagecodecs.jpegxl_decode),
    "JPEG XL e7": (lambda im: imagecodecs.jpegxl_encode(im, lossless=True, effort=7), imagecodecs.jpegxl_decode),
    "JPEG XL e9": (lambda im: imagecodecs.jpegxl_encode(im, lossless=True, effort=9), imagecodecs.jpegxl_decode),
    "JPEG XL e10": (lambda im: imagecodecs.jpegxl_encode(im, lossless=True, effort=10), imagecodecs.jpegxl_decode),
    # the smallest of efforts 1-10 for each image: the strongest JPEG XL anchor (encode time is all ten)
    "JPEG XL best effort": (lambda im: min((imagecodecs.jpegxl_encode(im, lossless=True, effort=e)
                                            for e in range(1, 11)), key=len), imagecodecs.jpegxl_decode),
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


def label(model: str) -> str:
    """A model's row name: the registered name, or a model file's stem (``fast-01b41279``)."""
    return f"wsi-idf {Path(model).stem if model.endswith('.safetensors') else model}"


def best_classical(rows: dict[str, float]) -> tuple[str, float]:
    """(name, bits) of the smallest classical codec among ``rows`` (bits per sub-pixel by name)."""
    return min(((n, b) for n, b in rows.items() if n in CLASSICAL), key=lambda nb: nb[1])


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


def tile_patches(tile: np.ndarray) -> np.ndarray:
    """A whole tile as the archive stores it: 80x80 patches, edges padded by repetition."""
    from wsi_idf.storage.shards import cut_patches
    side = -(-max(tile.shape[:2]) // 80) * 80
    return cut_patches(tile, side)[0]


def bench_whole_tiles(tiles: list[np.ndarray], models: list[str]) -> dict[str, float]:
    """Bits per sub-pixel on whole tiles: classical codecs see the whole image, wsi-idf its patches."""
    subpixels = sum(t.size for t in tiles)
    rows = {label(m): 8 * sum(len(b) for t in tiles for b in encode_patches(tile_patches(t), model=m))
            / subpixels for m in models}
    for name, (encode, decode) in CLASSICAL.items():
        blobs = [encode(t) for t in tiles]
        assert all(np.array_equal(decode(b), t) for b, t in zip(blobs, tiles)), name
        rows[name] = 8 * sum(map(len, blobs)) / subpixels
    return rows


def slide_patches(per_slide: int) -> np.ndarray:
    """Held-out patches from the real SVS slides (other scanners and hospitals than the tiles)."""
    from wsi_idf.slide import open_slide
    out = []
    for path in sorted((data_dir() / "slides").glob("*.svs")):
        slide = open_slide(path)
        lv = slide.levels[0]
        rng = np.random.default_rng(0)
        for _ in range(per_slide):
            y, x = int(rng.integers(0, lv.height - 80)) // 80 * 80, int(rng.integers(0, lv.width - 80)) // 80 * 80
            out.append(slide.read(0, y, y + 80, x, x + 80).transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(out))


def ratio_table(bits: dict[str, float]) -> list[str]:
    best_name, best_bits = best_classical(bits)
    return ["| codec | bits/sub-pixel | x JPEG XL e9 | x best classical |", "|---|---|---|---|",
            *[f"| {n} | {b:.3f} | {b / bits['JPEG XL e9']:.3f} | {b / best_bits:.3f} |" for n, b in bits.items()],
            f"\nBest classical here: {best_name}."]


def svg_plot(rows: dict[str, dict], path: Path, title: str) -> None:
    """Bits per sub-pixel against decode speed (log axis), one labelled point per codec; no plotting library."""
    import math
    width, height, left, bottom, top, right = 640, 420, 60, 50, 30, 150
    xs = [math.log10(r["decode_mpx_s"]) for r in rows.values()]
    ys = [r["bits_per_subpixel"] for r in rows.values()]
    x0, x1 = math.floor(min(xs)), math.ceil(max(xs))
    y0, y1 = math.floor(min(ys)), math.ceil(max(ys))
    px = lambda v: left + (v - x0) / max(x1 - x0, 1e-9) * (width - left - right)  # noqa: E731
    py = lambda v: height - bottom - (v - y0) / max(y1 - y0, 1e-9) * (height - top - bottom)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="11"><rect width="100%" height="100%" fill="white"/>',
             f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="13">{title}</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>',
             f'<text x="{(left + width - right) / 2}" y="{height - 12}" text-anchor="middle">decode Mpx/s (log), '
             f'2 CPU threads</text>',
             f'<text x="16" y="{height / 2}" transform="rotate(-90 16 {height / 2})" text-anchor="middle">'
             f'bits per sub-pixel (lower is better)</text>']
    for e in range(x0, x1 + 1):
        parts.append(f'<text x="{px(e)}" y="{height - bottom + 15}" text-anchor="middle">{10 ** e:g}</text>')
    for v in range(y0, y1 + 1):
        parts.append(f'<text x="{left - 8}" y="{py(v) + 4}" text-anchor="end">{v}</text>')
    for (name, r), x, y in zip(rows.items(), xs, ys):
        colour = "#c0392b" if name.startswith("wsi-idf") else "#2c3e50"
        parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="4" fill="{colour}"/>')
        parts.append(f'<text x="{px(x) + 7:.1f}" y="{py(y) + 4:.1f}" fill="{colour}">{name} {y:.2f}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=648, help="number of val patches (648 = all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--models", nargs="*", default=[*sorted(MODELS), str(WEIGHTS_DIR / RETIRED[0].weights)],
                        help="registered names or model files (default: the registered models and the previous "
                             "default's weights, for comparison)")
    parser.add_argument("--heldout", type=int, default=128, help="patches per real SVS slide (held-out set)")
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
        rows[label(name)] = bench_model(name, patches, args.batch_size)
    for name in CLASSICAL:
        rows[name] = bench_classical(name, hwc)
    ref = rows["JPEG XL e9"]["bytes"]
    best_name, best_bits = best_classical({n: 8 * r["bytes"] / subpixels for n, r in rows.items()})
    lines = [f"{len(patches)} patches of 80x80 from {folder} ({mpx:.2f} Mpx), torch threads {args.threads}, "
             f"{platform.processor() or platform.machine()}; best classical: {best_name}", "",
             "| codec | bits/sub-pixel | x JPEG XL e9 | x best classical | encode Mpx/s | decode Mpx/s | "
             "model NLL bits/sub-pixel | bytes / NLL |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        bpsp = 8 * r["bytes"] / subpixels
        nll = f"{r['nll_bits'] / subpixels:.3f} (float {r['float_nll_bits'] / subpixels:.3f})" if "nll_bits" in r else ""
        ratio = f"{8 * r['bytes'] / r['nll_bits']:.4f}" if "nll_bits" in r else ""
        lines.append(f"| {name} | {bpsp:.3f} | {r['bytes'] / ref:.3f} | {bpsp / best_bits:.3f} | "
                     f"{mpx / r['encode_s']:.3f} | {mpx / r['decode_s']:.3f} | {nll} | {ratio} |")
        r.update(bits_per_subpixel=bpsp, encode_mpx_s=mpx / r["encode_s"], decode_mpx_s=mpx / r["decode_s"])
    if torch.cuda.is_available():  # the same bytes on the GPU, and its speed
        lines += ["", "| GPU | encode Mpx/s | decode Mpx/s | bytes equal to CPU |", "|---|---|---|---|"]
        for name in args.models:
            cpu_blobs = encode_patches(patches, model=name)
            encode_patches(patches[:64], model=name, device="cuda")
            t0 = time.perf_counter()
            gpu_blobs = encode_patches(patches, model=name, batch_size=256, device="cuda")
            t1 = time.perf_counter()
            assert np.array_equal(decode_patches(gpu_blobs, model=name, batch_size=256, device="cuda"), patches)
            t2 = time.perf_counter()
            lines.append(f"| {label(name)} | {mpx / (t1 - t0):.2f} | {mpx / (t2 - t1):.2f} | "
                         f"{gpu_blobs == cpu_blobs} |")
    heldout = slide_patches(args.heldout)
    held = {label(m): 8 * sum(map(len, encode_patches(heldout, model=m))) / heldout.size for m in args.models}
    held_hwc = [np.ascontiguousarray(p.transpose(1, 2, 0)) for p in heldout]
    held.update({n: 8 * bench_classical(n, held_hwc)["bytes"] / heldout.size for n in CLASSICAL})
    lines += ["", f"Held out: {len(heldout)} patches of the two real SVS slides (other scanners and hospitals, never "
              f"trained on); bits per sub-pixel", "", *ratio_table(held)]
    whole = bench_whole_tiles(load_tiles(folder), args.models)
    lines += ["", "Whole validation tiles (classical codecs on each whole tile; wsi-idf on its 80x80 patches, as "
              "archived); bits per sub-pixel", "", *ratio_table(whole)]
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_codec.md").write_text(table + "\n")
    (out / "bench_codec.json").write_text(json.dumps({"patches": len(patches), "threads": args.threads,
                                                       "results": rows, "heldout": held, "whole_tiles": whole},
                                                      indent=2))
    svg_plot(rows, out / "bench_codec.svg", f"{len(patches)} val patches of 80x80: size against decode speed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
