"""Region reads: a 1024x1024 region through plain zarr, against tifffile and OpenSlide, same run.

Packs a real slide (default: the JPEG 2000 SVS) twice, with ``--codec idf`` (every pixel coded by
the IDF: the slow case) and with the default ``auto`` (its own tiles kept where smaller), and
unpacks the IDF archive to an OME-TIFF. Then, on a quiet machine and again while another process
keeps one core busy (``--load``), it times:

- the first read of a fresh process (``python -c``: import, open, read), through plain zarr;
- warm reads of 1024x1024 regions at seeded random places (median of ``--repeats``) through plain
  ``zarr.open``, through ``wsi_idf.open_archive(...).region``, through tifffile (the OME-TIFF via
  ``aszarr``) and through OpenSlide (the source slide);
- the peak RSS a region read adds to a fresh process.

    python benchmarks/bench_region.py --out results          # make bench-region
Target (issue 13): <= 1 s warm and <= 3 s first read through plain zarr on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
import zarr

from wsi_idf.archive.unpack import unpack_archive
from wsi_idf.jobs.pack import pack_slide
from wsi_idf.model.data import data_dir

SIDE = 1024
FIRST_READ = """
import sys, time
t = time.perf_counter()
import zarr
a = zarr.open_group(sys.argv[1], mode="r")["0"]
y, x = int(sys.argv[2]), int(sys.argv[3])
r = a[:, y:y + {side}, x:x + {side}]
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child reports its parent's peak
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(time.perf_counter() - t, peak / 1024)
"""


def places(width: int, height: int, count: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    return [(int(rng.integers(0, height - SIDE)), int(rng.integers(0, width - SIDE))) for _ in range(count)]


def timed(read, spots) -> float:
    seconds = []
    for y, x in spots:
        t = time.perf_counter()
        read(y, x)
        seconds.append(time.perf_counter() - t)
    return statistics.median(seconds)


def first_read(archive: Path, y: int, x: int) -> tuple[float, float, float]:
    """(seconds inside the process, seconds from process start, peak RSS MB) of a fresh read."""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", FIRST_READ.format(side=SIDE), str(archive), str(y), str(x)],
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), time.perf_counter() - t, float(out[1])


def measure(archives: dict[str, Path], tif: Path, source: Path, spots, label: str) -> list[dict]:
    import openslide

    import wsi_idf
    rows = []
    for name, archive in archives.items():
        inside, total, rss = first_read(archive, *spots[0])
        level = zarr.open_group(archive, mode="r")["0"]
        opened = wsi_idf.open_archive(archive)
        level[:, :SIDE, :SIDE]  # warm: model loaded, caches filled
        rows.append({"load": label, "reader": f"plain zarr, {name} archive", "first_read_s": round(total, 2),
                     "first_read_in_process_s": round(inside, 2), "first_read_peak_rss_mb": round(rss),
                     "warm_s": round(timed(lambda y, x: level[:, y:y + SIDE, x:x + SIDE], spots[1:]), 3)})
        rows.append({"load": label, "reader": f"open_archive().region, {name} archive",
                     "warm_s": round(timed(lambda y, x: opened.region(0, x, y, SIDE, SIDE), spots[1:]), 3)})
    store = tifffile.imread(tif, aszarr=True, level=0)
    page = zarr.open(store, mode="r")
    rows.append({"load": label, "reader": "tifffile, unpacked OME-TIFF",
                 "warm_s": round(timed(lambda y, x: page[y:y + SIDE, x:x + SIDE], spots[1:]), 3)})
    with openslide.OpenSlide(str(source)) as slide:
        rows.append({"load": label, "reader": "OpenSlide, source slide",
                     "warm_s": round(timed(lambda y, x: slide.read_region((x, y), 0, (SIDE, SIDE)), spots[1:]), 3)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slide", type=Path, default=data_dir() / "slides" / "tcga-cr-7395-01a-01-ts1.svs")
    parser.add_argument("--work", type=Path, default=Path("results/region-work"))
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-load", action="store_true", help="skip the run with a competing process")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    archives = {"idf": args.work / "idf.zarr", "auto": args.work / "auto.zarr"}
    for codec, archive in archives.items():
        if not archive.exists():
            pack_slide(args.slide, archive, codec=codec, progress=True)
    tif = args.work / "idf.ome.tif"
    if not tif.exists():
        unpack_archive(archives["idf"], tif)
    width, height = zarr.open_group(archives["idf"], mode="r")["0"].shape[2:0:-1]
    spots = places(width, height, args.repeats + 1)
    rows = measure(archives, tif, args.slide, spots, "quiet")
    if not args.no_load:
        burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(1)
            rows += measure(archives, tif, args.slide, spots, "one core busy")
        finally:
            burner.kill()
    header = (f"wsi-idf region reads: {SIDE}x{SIDE} regions of {args.slide.name} ({width}x{height}), "
              f"median of {args.repeats}, {platform.machine()}, {len(__import__('os').sched_getaffinity(0))} "
              f"cores, {time.strftime('%Y-%m-%d')}")
    lines = [header, "", "| load | reader | warm s | first read s (fresh process) | first read peak RSS MB |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['load']} | {r['reader']} | {r['warm_s']} | {r.get('first_read_s', '')} | "
              f"{r.get('first_read_peak_rss_mb', '')} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_region.md").write_text(text)
    (args.out / "bench_region.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
