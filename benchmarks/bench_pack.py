"""Pack benchmark: whole slides through the Dask pipeline, with time, size and peak memory.

For each slide (the real SVS files and a large generated pyramid of real tissue tiles) it packs,
verifies against the source, reads random 512x512 regions, and records the peak resident memory
of the client and of the busiest worker, which must not grow with the slide's size. Prints a
markdown table and saves it with a JSON copy under --out.

    python benchmarks/bench_pack.py --mosaic 6000x4800 --workers 2 --out results
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from slides import CMU_SVS, TCGA_SVS  # noqa: E402  (the real slides and real-tile builders)

from wsi_idf import open_archive  # noqa: E402
from wsi_idf.jobs.pack import pack_slide  # noqa: E402
from wsi_idf.jobs.verify import verify_archive  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_slide(path: Path, work: Path, client, model: str, codec: str = "auto") -> dict:
    out = work / f"{path.stem}-{codec}.zarr"
    shutil.rmtree(out, ignore_errors=True)
    address = client.scheduler.address
    t0 = time.perf_counter()
    summary = pack_slide(path, out, model=model, scheduler=address, codec=codec)
    t1 = time.perf_counter()
    verify_archive(out, source=path, scheduler=address)
    t2 = time.perf_counter()
    archive = open_archive(out)
    _, h, w = archive.levels[0].shape
    rng = np.random.default_rng(0)
    reads = []
    for _ in range(5):
        y, x = int(rng.integers(0, max(1, h - 512))), int(rng.integers(0, max(1, w - 512)))
        s = time.perf_counter()
        archive.region(0, x, y, min(512, w), min(512, h))
        reads.append(time.perf_counter() - s)
    worker_rss = max(client.run(peak_rss_mb).values())
    pixels = summary["raw_bytes"] / 3
    storage = "+".join(sorted({lv["storage"] if lv["storage"] == "idf" else lv["source_codec"]
                               for lv in summary["storage"]}))
    return {"slide": path.name, "codec": codec, "storage": storage, "levels": summary["levels"],
            "megapixels": round(pixels / 1e6, 1),
            "pack_s": round(t1 - t0, 1), "pack_mpx_s": round(pixels / 1e6 / (t1 - t0), 3),
            "verify_s": round(t2 - t1, 1), "region_512_ms": round(1000 * float(np.median(reads))),
            "source_mb": round(summary["source_bytes"] / 1e6, 2), "archive_mb": round(summary["archive_bytes"] / 1e6, 2),
            "bits_per_subpixel": summary["bits_per_subpixel"], "ratio_to_raw": summary["ratio_to_raw"],
            "ratio_to_source": summary["ratio_to_source"], "client_peak_rss_mb": round(peak_rss_mb()),
            "worker_peak_rss_mb": round(worker_rss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mosaic", default="6000x4800", help="generated slide size WxH (0 to skip)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--model", default="fast")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    from distributed import Client

    from wsi_idf.jobs.cluster import start_local_cluster
    work = args.work or Path(tempfile.mkdtemp(prefix="wsi-idf-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    slides = [CMU_SVS, TCGA_SVS]
    if args.mosaic != "0":
        width, height = (int(v) for v in args.mosaic.split("x"))
        path = work / f"mosaic-{width}x{height}.tif"
        if not path.exists():  # built in a child process, so the client's peak memory is the pack's own
            import subprocess
            subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                            "from pathlib import Path; from slides import *; "
                            "write_pyramidal_tiff(Path(sys.argv[2]), pyramid(mosaic(int(sys.argv[4]), int(sys.argv[3]), "
                            "seed=11), 3))", str(Path(__file__).resolve().parents[1] / "tests"), str(path),
                            str(width), str(height)], check=True)
        slides.append(path)
    rows = []
    with start_local_cluster(args.workers) as cluster, Client(cluster) as client:
        for path in slides:  # the lossy SVS files both ways: their own tiles kept (auto), and their pixels coded
            for codec in (("auto", "idf") if path.suffix == ".svs" else ("auto",)):
                rows.append(bench_slide(path, work, client, args.model, codec))
                print(json.dumps(rows[-1]), flush=True)
    columns = list(rows[0])
    table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    table += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    header = (f"wsi-idf pack benchmark, model {args.model}, {args.workers} worker process(es), "
              f"{platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}")
    text = header + "\n\n" + "\n".join(table) + "\n"
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_pack.md").write_text(text)
    (args.out / "bench_pack.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
