"""Scale benchmark: pack a generated gigapixel slide of real tissue; throughput per stage and peak memory.

The slide is a JPEG pyramidal TIFF mosaic of the real MoNuSeg tiles, streamed to disk tile by tile
(never held in memory), generated once under --work and never committed. The pack runs on a local
Dask cluster (or --scheduler). Reported: end-to-end Mpx/s; seconds per stage summed over tasks
(read + decode the source, network, entropy coding, write) and the share of each; peak RSS of the
client and of every worker process. Target (issue 5): peak memory <= 4 GB whatever the size.

    python benchmarks/bench_scale.py --gigapixels 4 --workers 2 --out results     # the full-size run
    python benchmarks/bench_scale.py --gigapixels 0.05                            # a quick CPU check
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from slides import write_mosaic_pyramid  # noqa: E402  (real-tile builder)

from wsi_idf.jobs.pack import pack_slide  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mosaic_shape(gigapixels: float) -> tuple[int, int, int]:
    """(width, height, pyramid levels) of a 4:3 level 0 of ``gigapixels``, halved down to ~1000 px."""
    width = int(math.sqrt(gigapixels * 1e9 * 4 / 3)) // 8 * 8
    height = int(gigapixels * 1e9 / width) // 8 * 8
    return width, height, max(1, int(math.log2(max(width, height) / 1000)) + 1)


def pack_and_measure(source: Path, out: Path, workers: int, device: str, model: str = "fast",
                     scheduler: str | None = None) -> dict:
    """Pack ``source`` with the IDF on a local cluster of ``workers`` (or ``scheduler``): Mpx/s end to
    end and per stage, peak RSS of every process. Also used by ``gpu_check.py``."""
    from distributed import Client

    from wsi_idf.jobs.cluster import start_local_cluster
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
    gpu = {"GPU": 1} if device.startswith("cuda") else None  # pack sends CUDA tasks only to GPU workers
    cluster = None if scheduler else start_local_cluster(workers, gpu)  # the cluster `wsi-idf pack` starts
    with Client(scheduler or cluster) as client:
        workers = len(client.scheduler_info()["workers"])
        summary = pack_slide(source, out, model=model, device=device, scheduler=client.scheduler.address,
                             progress=True, codec="idf")  # the IDF pipeline's throughput, though the tiles are JPEG
        worker_rss = client.run(peak_rss_mb)
    if cluster is not None:
        cluster.close()
    pixels = summary["raw_bytes"] / 3
    stages = summary["stage_seconds"]
    busy = sum(stages.values())
    rows = [{"stage": name.removesuffix("_s"), "task_seconds": round(sec, 1), "share": round(sec / busy, 3),
             "mpx_s_per_worker": round(pixels / 1e6 / sec, 2) if sec else None} for name, sec in stages.items()]
    return {"summary": summary, "levels": summary["levels"],
            "megapixels_all_levels": round(pixels / 1e6, 1), "source_gb": round(summary["source_bytes"] / 1e9, 3),
            "archive_gb": round(summary["archive_bytes"] / 1e9, 3), "bits_per_subpixel": summary["bits_per_subpixel"],
            "seconds": summary["seconds"], "end_to_end_mpx_s": round(pixels / 1e6 / summary["seconds"], 3),
            "workers": workers, "model": model, "device": device, "stages": rows,
            "client_peak_rss_mb": round(peak_rss_mb()),
            "worker_peak_rss_mb": {str(k): round(v) for k, v in worker_rss.items()}}



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gigapixels", type=float, default=4.0, help="level-0 size (default 4)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--model", default="fast")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--scheduler", default=None, help="an existing cluster instead of a local one")
    parser.add_argument("--work", type=Path, default=Path("results/scale-work"))
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--keep", action="store_true", help="keep the archive")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    width, height, levels = mosaic_shape(args.gigapixels)
    source = args.work / f"mosaic-{width}x{height}.tif"
    if not source.exists():
        t = time.perf_counter()
        tmp = source.with_suffix(".partial.tif")
        write_mosaic_pyramid(tmp, width, height, levels=levels)
        tmp.rename(source)
        print(f"generated {source} ({source.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s",
              flush=True)
    out = args.work / "scale.zarr"
    result = pack_and_measure(source, out, args.workers, args.device, args.model, args.scheduler)
    result.update(slide=source.name, level0=f"{width}x{height}")
    summary = result.pop("summary")
    rows, workers = result["stages"], result["workers"]
    header = (f"wsi-idf scale benchmark: {width}x{height} level 0, {summary['levels']} levels, model {args.model}, "
              f"{workers} worker(s), {platform.machine()}, {time.strftime('%Y-%m-%d')}")
    lines = [header, "", f"end to end: {result['end_to_end_mpx_s']} Mpx/s ({result['megapixels_all_levels']} Mpx "
             f"in {summary['seconds']} s), {result['bits_per_subpixel']} bits/sub-pixel, archive "
             f"{result['archive_gb']} GB from a {result['source_gb']} GB JPEG source", "",
             "| stage | task seconds | share | Mpx/s per worker |", "|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['task_seconds']} | {r['share']:.1%} | {r['mpx_s_per_worker']} |" for r in rows]
    lines += ["", "| process | peak RSS MB |", "|---|---|", f"| client | {result['client_peak_rss_mb']} |"]
    lines += [f"| worker {k} | {v} |" for k, v in result["worker_peak_rss_mb"].items()]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_scale.md").write_text(text)
    (args.out / "bench_scale.json").write_text(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
