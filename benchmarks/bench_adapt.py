"""Per-slide adaptation and the smallest-of patch mode against JPEG XL e9 per 80x80 patch (``make bench-adapt``).

For each unseen slide (the two SVS, every level-0 patch of the 80-px grid) and the val tiles:
bytes written by the shipped model (IDF only, and smallest of IDF / JPEG XL e3 / deflate), by the
model ``pack --codec idf --adapt MINUTES`` chose for the slide, and by lossless JPEG XL e9 coding
each patch alone, as ratios in the same run. Also: the encode time the smallest-of mode adds, the
adaptation's own report and the carried weights' bytes. Prints a table; writes results/bench_adapt.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import imagecodecs
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from wsi_idf.archive.layout import open_archive  # noqa: E402
from wsi_idf.coding.batch import encode_patches  # noqa: E402
from wsi_idf.jobs.pack import pack_slide  # noqa: E402
from wsi_idf.model.data import data_dir, grid_patches, load_tiles  # noqa: E402


def jxl_e9(patches: np.ndarray) -> int:
    return sum(len(imagecodecs.jpegxl_encode(np.ascontiguousarray(p.transpose(1, 2, 0)), lossless=True, effort=9))
               for p in patches)


def timed_bytes(patches: np.ndarray, model, jxl_effort) -> tuple[int, float]:
    t0 = time.process_time()
    size = sum(map(len, encode_patches(patches, model=model, jxl_effort=jxl_effort)))
    return size, time.process_time() - t0


def measure(name: str, patches: np.ndarray, adapted_model=None, extra: dict | None = None) -> dict:
    jxl = jxl_e9(patches)
    idf_only, t_off = timed_bytes(patches, "fast", None)
    smallest, t_on = timed_bytes(patches, "fast", 3)
    row = {"material": name, "patches": len(patches), "jxl_e9_bpsp": round(8 * jxl / patches.size, 4),
           "base_idf_x_jxl": round(idf_only / jxl, 4), "base_smallest_x_jxl": round(smallest / jxl, 4),
           "smallest_of_extra_encode_time": round(t_on / t_off - 1, 3)}
    if adapted_model is not None:
        adapted, _ = timed_bytes(patches, adapted_model, 3)
        adapted_idf, _ = timed_bytes(patches, adapted_model, None)
        row.update(adapted_idf_x_jxl=round(adapted_idf / jxl, 4), adapted_smallest_x_jxl=round(adapted / jxl, 4))
    return {**row, **(extra or {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=5.0, help="the --adapt budget (default 5)")
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    slides = data_dir() / "slides"
    rows = []
    for path in (slides / "cmu-1-small-region.svs", slides / "tcga-cr-7395-01a-01-ts1.svs"):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            summary = pack_slide(path, Path(tmp) / "a.zarr", codec="idf", adapt=args.minutes, scheduler="synchronous")
            seconds = time.perf_counter() - t0
            archive = open_archive(Path(tmp) / "a.zarr")
            level0 = archive.readers[0].region(0, 0, archive.readers[0].width, archive.readers[0].height)[0]
            patches = grid_patches([level0])
            rows.append(measure(path.name, patches, archive.readers[0].model, {
                "adaptation": summary["adaptation"], "weights_bytes": summary["model_bytes"],
                "archive_bytes": summary["archive_bytes"], "pack_adapt_seconds": round(seconds, 1)}))
            print(json.dumps(rows[-1]), flush=True)
    val = grid_patches(load_tiles(data_dir() / "tiles" / "val"))
    rows.append(measure("val tiles (trained on train/)", val))
    print(json.dumps(rows[-1]), flush=True)
    lines = ["| material | patches | JXL e9 bpsp | shipped IDF | shipped smallest-of | adapted IDF | adapted smallest-of "
             "| smallest-of extra encode time |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['material']} | {r['patches']} | {r['jxl_e9_bpsp']} | {r['base_idf_x_jxl']}x | "
                     f"{r['base_smallest_x_jxl']}x | {r.get('adapted_idf_x_jxl', '-')}x | "
                     f"{r.get('adapted_smallest_x_jxl', '-')}x | +{100 * r['smallest_of_extra_encode_time']:.0f}% |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_adapt.md").write_text(f"--adapt {args.minutes} (ratios to JPEG XL e9 per 80x80 patch)\n\n"
                                             + table + "\n")
    (args.out / "bench_adapt.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
