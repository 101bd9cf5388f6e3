"""The ``wsi-idf`` command line: thin subcommands over library functions.

Exit codes: 0 success, 1 a wsi-idf error (bad input, damaged data, weights mismatch),
2 usage error, 3 verification failed, 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence

from ._version import __version__
from .errors import WsiIdfError

log = logging.getLogger("wsi_idf")

EPILOG = """exit codes:
  0   success
  1   a wsi-idf error: unreadable or unsupported input, damaged data, model weights mismatch
  2   usage error
  3   verify found damaged or differing pixels; restore's file differs from the source's sha256
  130 interrupted (an interrupted pack is finished with --resume)

examples:
  wsi-idf pack slide.svs -o slide.zarr          pack with the default model on a local Dask cluster
  wsi-idf verify slide.zarr --source slide.svs  decode everything, compare with the source pixels
  wsi-idf region slide.zarr --level 0 --x 1000 --y 2000 --width 512 --height 512 -o region.png
  wsi-idf unpack slide.zarr -o slide.tif        back to a tiled pyramidal TIFF (every level in OpenSlide)
  wsi-idf restore slide.zarr -o slide.svs       the source file itself, byte for byte (sha256 checked)
"""

EXIT_VERIFY_FAILED = 3


def cmd_models(args: argparse.Namespace) -> int:
    from dataclasses import asdict
    from .coding.registry import DEFAULT_MODEL, MODELS, RETIRED, WEIGHTS_DIR
    rows = [{"name": e.name, "default": e.name == DEFAULT_MODEL and e in MODELS.values(),
             "status": "registered" if e in MODELS.values() else "retired: decodes old archives only",
             "weights": e.weights, "installed": (WEIGHTS_DIR / e.weights).exists(), "config": asdict(e.config),
             "description": e.description, "measured": asdict(e.measured) if e.measured else None}
            for e in (*MODELS.values(), *RETIRED)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("  name  weights                       bits/sub-pixel (val)  x JPEG XL e9  held-out  decode Mpx/s (2 threads)")
    for r in rows:
        m = r["measured"]
        numbers = (f"{m['val_bpsp']:20.3f}  {m['jxl_e9_ratio']:12.3f}  {m['heldout_bpsp']:8.3f}  "
                   f"{m['decode_mpx_s']:8.2f}" if m else f"{'not measured':>20s}")
        print(f"{'*' if r['default'] else ' '} {r['name']:5s} {r['weights']:29s} {numbers}")
        print(f"        {r['description']}" + ("" if r["status"] == "registered" else f" ({r['status']})"))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np
    from .coding.batch import decode_patches, encode_patches
    from .model.data import data_dir, grid_patches, load_tiles
    folder = data_dir() / "tiles" / "val"
    if not folder.is_dir():
        raise WsiIdfError(f"no example tiles at {folder}: set WSI_IDF_DATA to the shared data folder")
    patches = grid_patches(load_tiles(folder))[:: max(1, 648 // args.count)][: args.count]
    log.info("encoding %d real 80x80 patches from %s with model %r", len(patches), folder, args.model)
    t0 = time.perf_counter()
    blobs = encode_patches(patches, model=args.model)
    t1 = time.perf_counter()
    decoded = decode_patches(blobs, model=args.model)
    t2 = time.perf_counter()
    if not np.array_equal(decoded, patches):
        raise WsiIdfError("decoded pixels differ from the source: this is a bug, please report it")
    raw, packed = patches.nbytes, sum(map(len, blobs))
    summary = {"model": args.model, "patches": len(patches), "raw_bytes": raw, "encoded_bytes": packed,
               "ratio": round(raw / packed, 3), "bits_per_subpixel": round(8 * packed / raw, 4),
               "encode_mpx_s": round(len(patches) * 6400 / (t1 - t0) / 1e6, 3),
               "decode_mpx_s": round(len(patches) * 6400 / (t2 - t1) / 1e6, 3), "lossless": True}
    if args.json:
        print(json.dumps(summary))
    elif not args.quiet:
        print(f"{summary['patches']} patches, {raw} -> {packed} bytes ({summary['ratio']}x, "
              f"{summary['bits_per_subpixel']} bits per sub-pixel), encode {summary['encode_mpx_s']} Mpx/s, "
              f"decode {summary['decode_mpx_s']} Mpx/s, bit-exact round trip")
    return 0


def _emit(args: argparse.Namespace, summary: dict, text: str) -> None:
    if args.json:
        print(json.dumps(summary))
    elif not args.quiet:
        print(text)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _sizes(archive: int, raw: int, source: int, lossy: bool) -> str:
    """The archive's size against the raw pixels and the source file, in words nobody misreads.

    >>> _sizes(5_300_000, 9_400_000, 1_300_000, True)
    'archive 5.3 MB, 1.77x smaller than the raw pixels (9.4 MB) and 4.08x the size of the source file (1.3 MB, lossily compressed)'
    """
    versus_raw = (f"{raw / archive:.2f}x smaller than the raw pixels" if archive <= raw
                  else f"{archive / raw:.2f}x the size of the raw pixels")
    versus_source = (f"{source / archive:.2f}x smaller than the source file" if archive <= source
                     else f"{archive / source:.2f}x the size of the source file")
    return (f"archive {_mb(archive)}, {versus_raw} ({_mb(raw)}) and {versus_source} ({_mb(source)}"
            f"{', lossily compressed' if lossy else ''})")


def _storage(level: dict) -> str:
    if level.get("storage") == "source":
        how = "JPEG tiles, recompressed with JPEG XL" if level.get("source_codec") == "jpeg" else \
            "JPEG 2000 tiles as they are"
        return f"source ({how})"
    return "idf (learned lossless codec)"


def cmd_pack(args: argparse.Namespace) -> int:
    from .jobs.pack import pack_slide, partial_path
    try:
        s = pack_slide(args.slide, args.output, model=args.model, device=args.device, backend=args.backend,
                       shard=args.shard, zarr_format=args.zarr_format, drop_label=args.drop_label,
                       overwrite=args.overwrite, resume=args.resume, scheduler=args.scheduler, workers=args.workers,
                       resources=args.resources, progress=not args.quiet, codec=args.codec,
                       restorable=args.restorable)
    except KeyboardInterrupt:
        print(f"wsi-idf: interrupted; the unfinished archive is kept at {partial_path(args.output)}: "
              "run the same command with --resume to finish it", file=sys.stderr)
        return 130
    text = (f"{s['source']} -> {s['archive']}: {s['levels']} level(s), "
            f"{_sizes(s['archive_bytes'], s['raw_bytes'], s['source_bytes'], s['source_lossy'])}, "
            f"{s['bits_per_subpixel']} bits per sub-pixel, {s['seconds']} s")
    text += "\nstorage   " + "; ".join(f"level {i}: {_storage(lv)}" for i, lv in enumerate(s["storage"]))
    if s["backend"] == "openslide":
        text += ("\nread      through OpenSlide: its decoded pixels were coded with the IDF (OpenSlide does not hand "
                 "out a file's own tiles, so none could be kept)")
    if s["archive_bytes"] > s["source_bytes"]:
        coded = [str(i) for i, lv in enumerate(s["storage"]) if lv["storage"] != "source"]
        why = ("the source is stored lossily (e.g. JPEG) and level(s) " + ", ".join(coded) + " were coded from "
               "their decoded pixels, which a lossy file only approximates" if s["source_lossy"] and coded else
               "of the restore data (--restorable)" if s["restorable"] and not s["source_lossy"] else None)
        hint = ("; --codec auto keeps a file's own JPEG or JPEG 2000 tiles instead, pixel-exact and smaller"
                if args.codec == "idf" else "")
        text += "\nnote: the archive is larger than the source file" + (f" because {why}" if why else "") + hint
    text += ("\nrestore   `wsi-idf restore` gives the source file back byte for byte "
             f"({_mb(s['restore_bytes'])} of the archive)" if s["restorable"]
             else f"\nrestore   not restorable: {s['not_restorable_why']}")
    if s["skipped_levels"]:
        text += f"\nnote: {s['skipped_levels']} source level(s) left out; see `wsi-idf info`"
    if s["resumed"]:
        text += f"\nresumed: {s['shards_reused']} of {s['shards']} shards were already done and were reused"
    _emit(args, s, text)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .errors import VerificationError
    from .jobs.verify import verify_archive
    try:
        s = verify_archive(args.archive, source=args.source, backend=args.backend, scheduler=args.scheduler,
                           workers=args.workers, progress=not args.quiet)
    except VerificationError as exc:
        if args.json:
            print(json.dumps({"archive": str(args.archive), "ok": False, "error": str(exc),
                              "damaged_patches": exc.damaged, "problems": exc.problems}))
        print(f"wsi-idf: error: {exc}", file=sys.stderr)
        return EXIT_VERIFY_FAILED
    _emit(args, s, f"{s['archive']}: {s['levels']} level(s), {s['pixels']:,} pixels decoded, checksums ok"
          + (", every pixel equal to the source" if s["source_compared"] else ""))
    return 0


def cmd_unpack(args: argparse.Namespace) -> int:
    from .archive.unpack import unpack_archive
    s = unpack_archive(args.archive, args.output, overwrite=args.overwrite, progress=not args.quiet)
    _emit(args, s, f"{s['archive']} -> {s['tiff']}: {s['levels']} level(s), {_mb(s['bytes'])}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .archive.unpack import archive_info
    s = archive_info(args.archive)
    src = s["source"]
    lines = [f"archive   {s['archive']} (Zarr v{s['zarr_format']}, wsi-idf {s['wsi_idf_version']})",
             f"source    {src['name']}, {_mb(src['size'])}, sha256 {src['sha256'][:16]}..., read with "
             f"{src['decoder'].get('reader')}",
             f"model     {s['model']['name']} (weights {s['model']['weights'][:16]}...)",
             f"slide     {s['vendor']}, mpp {s['mpp'] or 'unknown'}, objective {s['objective_power'] or 'unknown'}, "
             f"ICC profile {'yes' if s['icc_profile'] else 'no'}, {s['properties']} properties"]
    for lv in s["levels"]:
        lines.append(f"level {lv['path']}   {lv['width']} x {lv['height']}, downsample {lv['downsample']:.4g}, "
                     f"{_mb(lv['encoded_bytes'])}, {_storage(lv)}")
    for lv in s["skipped_levels"]:
        lines.append(f"left out  source level {lv['level']} ({lv['width']} x {lv['height']}): {lv['reason']}")
    restore = s["restore"]
    lines.append("restore   " + (f"restorable: `wsi-idf restore` gives {src['name']} back byte for byte "
                                 f"({_mb(restore.get('stored_bytes', 0))} of restore data)"
                                 if restore.get("restorable") else f"not restorable: {restore.get('why')}"))
    lines.append(f"images    {', '.join(s['associated']) or 'none'}"
                 + (" (label dropped)" if s["label_dropped"] else ""))
    lines.append(f"size      {_sizes(s['archive_bytes'], s['raw_bytes'], src['size'], s['source_lossy'])}, "
                 f"{s['bits_per_subpixel']} bits per sub-pixel")
    _emit(args, s, "\n".join(lines))
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from .archive.restore import RestoreMismatchError, restore_file
    try:
        s = restore_file(args.archive, args.output, overwrite=args.overwrite, progress=not args.quiet)
    except RestoreMismatchError as exc:
        if args.json:
            print(json.dumps({"archive": str(args.archive), "ok": False, "error": str(exc)}))
        print(f"wsi-idf: error: {exc}", file=sys.stderr)
        return EXIT_VERIFY_FAILED
    if s["unchanged"]:
        _emit(args, s, f"{s['restored']} already holds {s['source']} byte for byte (sha256 {s['sha256'][:16]}...): "
                       "left as it is")
    else:
        _emit(args, s, f"{s['archive']} -> {s['restored']}: {s['source']}, {s['bytes']:,} bytes, sha256 "
                       f"{s['sha256'][:16]}... equal to the source's")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .web.app import serve
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: anyone who reaches this address sees these slides; put it behind the lab's "
                    "own access control (or use an SSH tunnel to 127.0.0.1 instead)", args.host)
    if not args.quiet:
        print(f"serving {args.path} at http://{args.host}:{args.port}/ (Ctrl-C stops)", file=sys.stderr)
    serve(args.path, host=args.host, port=args.port, show_label=args.show_label,
          log_level="info" if args.verbose else "warning")
    return 0


def cmd_region(args: argparse.Namespace) -> int:
    from .archive.unpack import write_region
    s = write_region(args.archive, args.output, args.level, args.x, args.y, args.width, args.height, args.flow_levels,
                     overwrite=args.overwrite)
    preview = f" (preview from {args.flow_levels} flow level(s), {s['bytes_read']:,} bytes read)" if args.flow_levels else ""
    _emit(args, s, f"level {s['level']} x={s['x']} y={s['y']} {s['width']}x{s['height']} -> {s['out']}{preview}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path
    from .model.data import data_dir
    from .model.training import TrainSettings, train_model
    data = args.data or [data_dir() / "tiles" / "train"]
    val = args.val or ([data_dir() / "tiles" / "val"] if not args.data else None)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, eval_every=args.eval_every,
                             quantize_from=args.quantize_from, align=args.align,
                             time_limit_s=args.minutes * 60 if args.minutes else None)
    try:
        s = train_model(args.model, [Path(d) for d in data], args.out, val=[Path(v) for v in val] if val else None,
                        settings=settings, init_from=args.init_from, device=args.device, grow_from=args.grow_from)
    except ValueError as exc:
        raise WsiIdfError(str(exc)) from exc
    _emit(args, s, f"exported {s['model']}: validation {s['val_coded_bpsp']} bits per sub-pixel written "
                   f"(float model {s['val_float_bpsp']}), exact round trip on {s['val_patches']} patches; "
                   f"to ship it, add it to MODELS in wsi_idf/coding/registry.py and copy it to wsi_idf/weights/")
    return 0


def _shipped_weights(name: str) -> str:
    """The shipped weights file of a registered model, as a path a user can pass (for help texts)."""
    from .coding.registry import WEIGHTS_DIR, entry
    return str(WEIGHTS_DIR / entry(name).weights)


def _resources(text: str) -> dict[str, float]:
    try:
        return {name.strip(): float(value) for name, value in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=N[,NAME=N], e.g. GPU=1, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_cluster_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="Dask scheduler address (tcp://host:port) to use an existing cluster; 'synchronous' runs "
                        "in this process; default: an embedded local cluster")
    p.add_argument("--workers", type=_positive_int, default=None, help="worker processes of the embedded cluster "
                                                                       "(default: from the CPU count)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsi-idf", description="Lossless whole-slide image archiving with Integer Discrete Flows.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"wsi-idf {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    common.add_argument("-q", "--quiet", action="store_true", help="only errors")
    common.add_argument("--json", action="store_true", help="print a machine-readable JSON summary")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("models", parents=[common], help="list the registered models")
    p.set_defaults(func=cmd_models)
    p = sub.add_parser("demo", parents=[common], help="encode and decode real H&E patches, print sizes and speed",
                       description="Encode and decode 80x80 patches of the validation tiles in $WSI_IDF_DATA "
                                   "(default ../shared/data) and check the round trip is bit-exact.")
    p.add_argument("--model", default=None, help="registered model name (default: the default model)")
    p.add_argument("--count", type=int, default=64, help="number of patches (default 64)")
    p.set_defaults(func=cmd_demo)

    from pathlib import Path
    p = sub.add_parser("pack", parents=[common], help="pack a slide into a lossless OME-Zarr archive",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Pack every pyramid level of SLIDE (SVS, pyramidal TIFF, OME-TIFF, NDPI, MRXS, "
                                   "SCN, ... via tifffile or OpenSlide) into a sharded Zarr v3 OME-NGFF archive, "
                                   "losslessly. Runs on a Dask cluster; encodes on GPU workers where there are any. "
                                   "The archive appears only when complete; an interrupted pack is kept as "
                                   "OUT.partial and finished with --resume.")
    p.add_argument("slide", type=Path, help="the slide file")
    p.add_argument("-o", "--output", type=Path, required=True, help="the archive to write (e.g. slide.zarr)")
    p.add_argument("--model", default=None, help="registered model (see `wsi-idf models`; default: fast)")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda or cuda:N")
    p.add_argument("--backend", default="auto", choices=["auto", "tifffile", "openslide"],
                   help="slide reader (auto: tifffile for TIFF-based files, else OpenSlide)")
    p.add_argument("--shard", type=int, default=1280, help="shard side in pixels, a multiple of 80 (default 1280)")
    p.add_argument("--codec", choices=["auto", "idf", "source"], default="auto",
                   help="auto (default): keep the slide's own tiles where they are lossy (JPEG, recompressed "
                        "losslessly with JPEG XL; JPEG 2000 as is), pixel-exact and smaller than the source, and "
                        "code other levels with the IDF; idf: code every level's pixels with the IDF; source: "
                        "keep every level's tiles or refuse"),
    p.add_argument("--zarr-format", type=int, choices=[2, 3], default=3,
                   help="3 (default, sharded, OME-NGFF 0.5) or 2 (one file per patch, OME-NGFF 0.4)")
    p.add_argument("--drop-label", action="store_true", help="leave out the label image (it may carry patient "
                                                             "identifiers)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing wsi-idf archive, once the new "
                                                            "one is complete (never a file or another folder)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted pack of the same slide")
    p.add_argument("--restorable", action="store_true",
                   help="also keep the bytes of levels coded from their pixels (deflate, LZW, OpenSlide-read "
                        "formats), so that `wsi-idf restore` gives the source file back: a larger archive. "
                        "Archives whose levels all keep their tiles are restorable without it")
    p.add_argument("--resources", type=_resources, default=None, metavar="NAME=N[,...]",
                   help="run encoding only on Dask workers declaring these resources (e.g. GPU=1; "
                        "implied by --device cuda)")
    _add_cluster_options(p)
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("train", parents=[common], help="train or fine-tune a model on tiles or slides",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a registered configuration on random 80x80 crops (flips, rotations; "
                                   "background crops down-weighted) of the tiles and slides in --data, with "
                                   "resumable checkpoints in --out (run again to continue), then export the exact "
                                   "integer coding model and prove it round-trips on the validation patches. "
                                   "The exported weights are the moving average (EMA) with the best validation "
                                   "bits seen; the checkpoint keeps the optimizer state, so a rerun continues the "
                                   "same run.\n\n"
                                   "Fine-tune a shipped model on a lab's own slides:\n"
                                   f"  wsi-idf train fast --init-from {_shipped_weights('fast')} "
                                   "--data /lab/slides --minutes 60 --out finetuned/")
    p.add_argument("model", help="registered configuration (fast) or candidate in training (max, grown from fast "
                                 "with --grow-from); the name of the exported file")
    p.add_argument("--data", action="append", type=Path, default=None,
                   help="folder (or file) of tiles and/or slides; repeatable (default: the shared train tiles)")
    p.add_argument("--val", action="append", type=Path, default=None,
                   help="validation folder (default: the shared val tiles, or a tenth of the training tiles)")
    p.add_argument("--out", type=Path, default=Path("checkpoints"), help="checkpoints, log and exported model")
    p.add_argument("--init-from", type=Path, default=None, help="a model file to fine-tune (its float weights)")
    p.add_argument("--grow-from", type=Path, default=None,
                   help="a smaller model file that a new run of a larger configuration starts as (added blocks "
                        "and levels start as no change)")
    p.add_argument("--steps", type=int, default=100000)
    p.add_argument("--minutes", type=float, default=None, help="stop (checkpointed) after this long")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--quantize-from", type=int, default=0, metavar="STEP",
                   help="train in float before this step, quantization-aware from it (default 0: QAT "
                        "throughout, right for fine-tuning; from scratch, float first learns faster)")
    p.add_argument("--align", type=int, default=1, help="crop corners on this grid (8: the JPEG block grid)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("verify", parents=[common], help="decode everything and check checksums (and the source)",
                       description="Decode every patch, check each level against the checksum of its raw pixels "
                                   "taken at pack time and, with --source, compare every pixel with the slide.")
    p.add_argument("archive", type=Path)
    p.add_argument("--source", type=Path, default=None, help="the original slide: compare every pixel")
    p.add_argument("--backend", default="auto", choices=["auto", "tifffile", "openslide"],
                   help="reader for --source")
    _add_cluster_options(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("unpack", parents=[common], help="write the archive as a tiled pyramidal TIFF",
                       description="Write every level, pixel-identical, to a tiled pyramidal TIFF (deflate; levels as "
                                   "top-level IFDs, as libvips writes them): OpenSlide, QuPath and tifffile read every "
                                   "level; MPP in the resolution tags; label, macro and thumbnail as separate images.")
    p.add_argument("archive", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True, help="the TIFF to write (e.g. slide.tif)")
    p.add_argument("--overwrite", action="store_true", help="replace a TIFF that wsi-idf unpack wrote earlier")
    p.set_defaults(func=cmd_unpack)

    p = sub.add_parser("restore", parents=[common], help="write the archive's source file back, byte for byte",
                       description="Write the slide file the archive was packed from, byte for byte: its kept tiles "
                                   "from their chunks, everything else from the archive's restore data. The file is "
                                   "written beside OUTPUT under a temporary name and renamed into place only once "
                                   "its sha256 equals the one recorded at pack time (else exit 3, nothing left). "
                                   "`wsi-idf info` says whether an archive is restorable.")
    p.add_argument("archive", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True, help="the file to write (e.g. slide.svs)")
    p.add_argument("--overwrite", action="store_true",
                   help="accept an existing OUTPUT that already holds the source's exact bytes (it is left as it is; "
                        "anything else is refused, and nothing is ever replaced)")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("serve", parents=[common], help="browse archives in a web browser (catalog and viewer)",
                       description="Serve PATH (one archive, or a folder searched recursively for archives) read-only "
                                   "over HTTP: a catalog page, an OpenSeadragon viewer per slide and Deep Zoom tiles "
                                   "(PNG tiles are the stored pixels exactly at every archive level). Binds to "
                                   "127.0.0.1: reach it from another machine through an SSH tunnel "
                                   "(ssh -L 8000:127.0.0.1:8000 labserver).")
    p.add_argument("path", type=Path)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; another only "
                                                        "behind the lab's own access control)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--show-label", action="store_true", help="show label images (they may carry patient identifiers)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("info", parents=[common], help="describe an archive: source, levels, model, sizes")
    p.add_argument("archive", type=Path)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("region", parents=[common], help="write one region of one level as PNG or TIFF",
                       description="Decode only the patches one region touches and write it as PNG "
                                   "(or TIFF for a .tif name). A region may have up to 64 Mpx (e.g. 8192x8192; "
                                   "it is held in memory about 3 times over): write whole levels with unpack.")
    p.add_argument("archive", type=Path)
    p.add_argument("--level", type=int, default=0)
    p.add_argument("--x", type=int, required=True, help="left edge, in pixels of that level")
    p.add_argument("--y", type=int, required=True, help="top edge, in pixels of that level")
    p.add_argument("--width", type=int, required=True)
    p.add_argument("--height", type=int, required=True)
    p.add_argument("-o", "--output", type=Path, required=True, help="region.png or region.tif (lossless formats only)")
    p.add_argument("--overwrite", action="store_true", help="replace a region file wsi-idf wrote earlier")
    p.add_argument("--flow-levels", "--levels", dest="flow_levels", type=int, default=None, metavar="K",
                   help="progressive preview: read and decode only the K coarsest flow levels of each patch "
                        "(1 = top latents only; default: all, lossless)")
    p.set_defaults(func=cmd_region)
    return parser


class StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a message is logged (it may be replaced after
    logging is configured: a test's capture, a redirected batch job)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure_logging(level: int) -> None:
    """wsi-idf's own messages at ``level``; Dask's only with -vv (it logs every worker start at INFO)."""
    logger = logging.getLogger("wsi_idf")
    if not logger.handlers:
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("wsi-idf: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)
    logging.getLogger("distributed").setLevel(level if level <= logging.DEBUG else logging.CRITICAL)
    if level > logging.DEBUG:  # tifffile logs the damage it finds; wsi_idf.slide turns that into one error
        tiff_logger = logging.getLogger("tifffile")
        tiff_logger.addHandler(logging.NullHandler())
        tiff_logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.ERROR if args.quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    configure_logging(level)
    try:
        return args.func(args)
    except WsiIdfError as exc:
        print(f"wsi-idf: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("wsi-idf: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
