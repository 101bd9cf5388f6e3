"""One prepared run on a GPU machine: CUDA-vs-CPU exactness, GPU pack throughput, a training burst.

GPU time comes in short windows on a machine without zarr, numcodecs, dask or constriction, and
without ../shared. ``make gpu-wheels`` (here, on CPU) puts the wheels it lacks and a small copy of
the real data into ignored folders (.whl/, .gpu-data/); ``make gpu-check OUT=dir`` (there) installs
the wheels and runs this script, which

  a. encodes real val patches on the device with every registered model and checks the bytes
     equal a CPU encode, then decodes them on CPU exactly (the "any machine" promise), and decodes
     the CPU's bytes on the device exactly (the zarr codec decodes there when it can);
  b. packs a generated real-tissue slide (uncompressed TIFF, so no imagecodecs is needed) through
     the embedded Dask cluster with device workers: end-to-end and per-stage Mpx/s, peak RSS;
  c. spends the minutes left continuing the shipped model's training run on the device, writing
     its checkpoint and log to ``--out`` (<= 16 MiB) to continue on CPU (``make train``);

then prints one table (also ``--out``/gpu_check.md and .json) and exits inside ``--budget-s``.
``--device cpu --small`` runs the same steps on CPU in well under 2 minutes (a test runs it).

    python benchmarks/gpu_check.py --device cuda --out results/gpu-check      # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --small --out /tmp/gpu-check   # anywhere
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from wsi_idf.coding import decode_patches, encode_patches  # noqa: E402
from wsi_idf.coding.registry import MODELS  # noqa: E402
from wsi_idf.model.data import data_dir, grid_patches, load_tiles  # noqa: E402

CHECKPOINT = ROOT / "training" / "fast.ckpt.safetensors"
SELECTION = 256  # the training run's validation patches (``train_model``'s holdout)
SMALL_TRAIN = ("tiatoolbox", "torchstain", "hipt", "prov_gigapath", "torch_staintools")


def stage_data(data: Path, dest: Path, mosaic_tiles: int = 3) -> None:
    """A small copy of the real data for the GPU machine (``../shared`` does not travel there): the
    training run's 256 validation patches as one lossless 1280x1280 PNG (so its validation numbers
    stay comparable), a few MoNuSeg tiles for the generated slide, and the small training sets."""
    from PIL import Image

    from wsi_idf.model.data import find_training_data
    tiles, _ = find_training_data([data / "tiles" / "val"])
    holdout = grid_patches(tiles)
    holdout = holdout[:: max(1, len(holdout) // SELECTION)][:SELECTION]
    side = int(math.isqrt(SELECTION))
    mosaic = holdout.reshape(side, side, 3, 80, 80).transpose(0, 3, 1, 4, 2).reshape(side * 80, side * 80, 3)
    (dest / "tiles" / "val").mkdir(parents=True, exist_ok=True)
    Image.fromarray(mosaic).save(dest / "tiles" / "val" / "selection.png")
    again = grid_patches(find_training_data([dest / "tiles" / "val"])[0])
    assert np.array_equal(again, holdout), "the staged validation patches differ from the run's"
    train = dest / "tiles" / "train"
    for name in SMALL_TRAIN:
        shutil.copytree(data / "tiles" / "train" / name, train / name, dirs_exist_ok=True)
    (train / "monuseg").mkdir(parents=True, exist_ok=True)
    for path in sorted((data / "tiles" / "train" / "monuseg").glob("*.tif"))[:mosaic_tiles]:
        shutil.copy2(path, train / "monuseg" / path.name)


def register_codecs() -> None:
    """The GPU machine runs wsi-idf from the source tree, without its entry points: register its codecs."""
    import numcodecs
    import zarr.registry

    from wsi_idf.storage.numcodecs_codec import WsiIdf
    from wsi_idf.storage.zarr_codec import WsiIdfCodec
    numcodecs.register_codec(WsiIdf)
    zarr.registry.register_codec("wsi_idf", WsiIdfCodec)


def check_exactness(device: str, patches: np.ndarray) -> list[dict]:
    """Per registered model: device bytes == CPU bytes, CPU decode exact; device encode Mpx/s."""
    rows = []
    for name in MODELS:
        cpu = encode_patches(patches, model=name, batch_size=256, device="cpu")
        encode_patches(patches[:8], model=name, device=device)  # warm-up (CUDA context, kernels)
        t = time.perf_counter()
        timings: dict[str, float] = {}
        dev = encode_patches(patches, model=name, batch_size=256, device=device, timings=timings)
        seconds = time.perf_counter() - t
        same = sum(a == b for a, b in zip(cpu, dev))
        exact = bool(np.array_equal(decode_patches(dev, model=name, batch_size=256, device="cpu"), patches))
        t = time.perf_counter()  # the zarr codec decodes on the GPU when there is one: CPU bytes, GPU pixels
        device_exact = bool(np.array_equal(decode_patches(cpu, model=name, batch_size=256, device=device), patches))
        decode_seconds = time.perf_counter() - t
        mpx = patches.shape[0] * patches.shape[2] * patches.shape[3] / 1e6
        rows.append({"model": name, "patches": len(patches), "identical_bytes": same, "cpu_decode_exact": exact,
                     "device_decode_exact": device_exact, "encode_mpx_s": round(mpx / seconds, 2),
                     "network_mpx_s": round(mpx / timings["model_s"], 2),
                     "entropy_mpx_s": round(mpx / timings["entropy_s"], 2),
                     "decode_mpx_s": round(mpx / decode_seconds, 2)})
        if same != len(patches) or not exact or not device_exact:
            raise SystemExit(f"{name}: {device} bytes differ from CPU for {len(patches) - same} patches "
                             f"(CPU decode exact: {exact}, {device} decode exact: {device_exact}): "
                             "the coding path is not reproducible")
    return rows


def pack_throughput(device: str, gigapixels: float, workers: int, work: Path) -> dict:
    from bench_scale import mosaic_shape, pack_and_measure
    from slides import write_mosaic_pyramid
    width, height, levels = mosaic_shape(gigapixels)
    t = time.perf_counter()
    source = write_mosaic_pyramid(work / "mosaic.tif", width, height, compression=None, levels=levels)
    generated_s = time.perf_counter() - t
    result = pack_and_measure(source, work / "mosaic.zarr", workers, device)
    result.pop("summary")
    shutil.rmtree(work, ignore_errors=True)
    return {"level0": f"{width}x{height}", "generate_s": round(generated_s, 1), **result}


def training_burst(device: str, seconds: float, out: Path, data: Path, small: bool) -> dict:
    """Continue the committed training run (the same recipe as ``make train``) for ``seconds``."""
    from wsi_idf.model.training import TrainSettings, train_model
    out.mkdir(parents=True, exist_ok=True)
    for name in ("fast.ckpt.safetensors", "fast.log.jsonl"):
        if (CHECKPOINT.parent / name).exists():
            shutil.copy2(CHECKPOINT.parent / name, out / name)
    settings = TrainSettings(steps=10**7, quantize_from=7500, time_limit_s=seconds, eval_every=20 if small else 250)
    summary = train_model("fast", [data / "tiles" / "train"], out, val=[data / "tiles" / "val"], settings=settings,
                          device=device, val_patches=32 if small else 256, export=False)
    log = [json.loads(line) for line in (out / "fast.log.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in log if "step" in r]
    return {"seconds": round(seconds), "last_step": steps[-1]["step"] if steps else None,
            "val_float_bpsp": summary["val_float_bpsp"],
            "checkpoint_mb": round((out / "fast.ckpt.safetensors").stat().st_size / 2**20, 1)}


def table(result: dict) -> str:
    lines = [f"wsi-idf gpu-check: device {result['device']} ({result['device_name']}), torch {result['torch']}, "
             f"{platform.machine()}, {time.strftime('%Y-%m-%d')}", "",
             "| model | patches | identical bytes (device vs CPU) | CPU decode exact | device decode exact "
             "| encode Mpx/s | network Mpx/s | entropy Mpx/s | device decode Mpx/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['patches']} | {r['identical_bytes']} | {r['cpu_decode_exact']} | "
              f"{r['device_decode_exact']} | {r['encode_mpx_s']} | {r['network_mpx_s']} | {r['entropy_mpx_s']} | "
              f"{r['decode_mpx_s']} |" for r in result["exactness"]]
    pack = result["pack"]
    lines += ["", f"pack: {pack['level0']} level 0, {pack['megapixels_all_levels']} Mpx in {pack['seconds']} s = "
              f"**{pack['end_to_end_mpx_s']} Mpx/s end to end**, {pack['workers']} worker(s), "
              f"{pack['bits_per_subpixel']} bits/sub-pixel", "",
              "| stage | task seconds | share | Mpx/s per worker |", "|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['task_seconds']} | {r['share']:.1%} | {r['mpx_s_per_worker']} |"
              for r in pack["stages"]]
    rss = {"client": pack["client_peak_rss_mb"],
           **{f"worker {i}": v for i, v in enumerate(pack["worker_peak_rss_mb"].values())}}
    lines += ["", "peak RSS MB: " + ", ".join(f"{k} {v}" for k, v in rss.items())]
    burst = result["training"]
    lines += ["", f"training burst: {burst['seconds']} s to step {burst['last_step']}, val {burst['val_float_bpsp']} "
              f"bits/sub-pixel (float EMA), checkpoint {burst['checkpoint_mb']} MB in the output folder",
              "", f"total {result['total_s']} s of a {result['budget_s']} s budget"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny sizes: a CPU run in under 2 minutes")
    parser.add_argument("--out", type=Path, default=Path("results/gpu-check"))
    parser.add_argument("--data", type=Path, default=None, help="real data (default: WSI_IDF_DATA or ../shared/data)")
    parser.add_argument("--budget-s", type=float, default=None, help="whole run (default 480; 60 with --small)")
    parser.add_argument("--gigapixels", type=float, default=None, help="generated slide (default 1; 0.002 small)")
    parser.add_argument("--workers", type=int, default=None,
                        help="pack workers (default 8 on a GPU: each codes on its own CPU core; 1 on CPU)")
    parser.add_argument("--stage", type=Path, default=None, metavar="DIR",
                        help="only copy the small data set for the GPU machine into DIR (make gpu-wheels)")
    args = parser.parse_args(argv)
    if args.stage:
        stage_data(args.data or data_dir(), args.stage)
        return 0
    register_codecs()
    start = time.perf_counter()
    budget = args.budget_s or (60 if args.small else 480)
    data = args.data or data_dir()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --device cpu --small to check the script itself")
    patches = grid_patches(load_tiles(data / "tiles" / "val"))
    patches = np.ascontiguousarray(patches[:: max(1, len(patches) // (32 if args.small else 256))]
                                   [: 32 if args.small else 256])
    result = {"device": args.device, "torch": torch.__version__, "budget_s": budget,
              "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"}
    result["exactness"] = check_exactness(args.device, patches)
    print(f"exactness ok ({time.perf_counter() - start:.0f} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-work-", dir=args.out))  # ours alone: removed after the pack
    workers = args.workers or (8 if args.device.startswith("cuda") else 1)  # entropy coding is per worker, on CPU
    result["pack"] = pack_throughput(args.device, args.gigapixels or (0.002 if args.small else 1.0), workers, work)
    print(f"pack done ({time.perf_counter() - start:.0f} s)", flush=True)
    left = budget - (time.perf_counter() - start) - (15 if args.small else 45)  # export margin, the table
    result["training"] = training_burst(args.device, max(5.0, left), args.out, data, args.small)
    result["total_s"] = round(time.perf_counter() - start)
    text = table(result)
    print("\n" + text)
    (args.out / "gpu_check.md").write_text(text)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
