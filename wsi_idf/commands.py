"""What each ``wsi-idf`` subcommand does and prints: thin wrappers over library functions (the
parser and ``main`` live in ``wsi_idf.cli``)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from .errors import WsiIdfError

log = logging.getLogger("wsi_idf")


EXIT_VERIFY_FAILED = 3


def cmd_models(args: argparse.Namespace) -> int:
    from dataclasses import asdict
    from .coding.registry import DEFAULT_MODEL, MODELS, RETIRED, WEIGHTS_DIR, user_models, user_models_dir
    rows = [{"name": e.name, "default": e.name == DEFAULT_MODEL and e in MODELS.values(),
             "status": "registered" if e in MODELS.values() else "retired: decodes old archives only",
             "weights": e.weights, "installed": (WEIGHTS_DIR / e.weights).exists(), "config": asdict(e.config),
             "description": e.description, "measured": asdict(e.measured) if e.measured else None}
            for e in (*MODELS.values(), *RETIRED)]
    rows += [{"name": name, "default": False, "status": f"user model in {user_models_dir()}",
              "weights": path.name, "installed": True, "config": None, "description": f"a lab's own model ({path})",
              "measured": None} for name, path in user_models()]
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
    print(f"user models folder: {user_models_dir()} (WSI_IDF_MODELS); `wsi-idf train NAME` exports there, and "
          "`pack --model` also takes a model file's path")
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


def _model_line(name: str, adaptation: dict | None, model_bytes: int, archive_bytes: int) -> str:
    """Which model coded the archive, what adapting it measured, and the weights' share of the archive."""
    share = f"; its weights are {_mb(model_bytes)}, {100 * model_bytes / max(archive_bytes, 1):.2f}% of the archive" \
        if model_bytes else ""
    line = f"model     {name}{share}"
    if adaptation:
        if adaptation.get("skipped"):
            line += f"\nadapt     not adapted: {adaptation['skipped']}"
        else:
            gain = 100 * (1 - adaptation["adapted_bpsp"] / adaptation["base_bpsp"])
            line += (f"\nadapt     {adaptation['steps']} steps in {adaptation['seconds']:.0f} s; on "
                     f"{adaptation['heldout_patches']} held-out patches the base model writes {adaptation['base_bpsp']}"
                     f" and the adapted {adaptation['adapted_bpsp']} bits per sub-pixel ({gain:+.2f}% smaller): the "
                     f"{adaptation['kept']} model coded the slide")
    return line


def cmd_pack(args: argparse.Namespace) -> int:
    from .jobs.pack import pack_slide, partial_path
    try:
        s = pack_slide(args.slide, args.output, model=args.model, device=args.device, backend=args.backend,
                       shard=args.shard, zarr_format=args.zarr_format, drop_label=args.drop_label,
                       overwrite=args.overwrite, resume=args.resume, scheduler=args.scheduler, workers=args.workers,
                       resources=args.resources, progress=not args.quiet, codec=args.codec,
                       restorable=args.restorable, adapt=args.adapt, adapt_steps=args.adapt_steps,
                       adapt_seed=args.adapt_seed)
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
    text += "\n" + _model_line(s["model"], s["adaptation"], s["model_bytes"], s["archive_bytes"])
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
             _model_line(f"{s['model']['name']} (weights {s['model']['weights'][:16]}...)",
                         s["model"].get("adaptation"), s["model_bytes"], s["archive_bytes"]),
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
    from .coding.registry import check_model_name, resolve_model, user_models_dir
    check_model_name(args.model)
    init_from = resolve_model(args.init_from).path if args.init_from else None
    export_dir = args.export_to or user_models_dir()
    try:
        s = train_model(args.model, [Path(d) for d in data], args.out, val=[Path(v) for v in val] if val else None,
                        settings=settings, init_from=init_from, device=args.device, grow_from=args.grow_from,
                        export_dir=export_dir, progress=not args.quiet)
    except ValueError as exc:
        raise WsiIdfError(str(exc)) from exc
    use = f"--model {args.model}" if not args.export_to else f"--model {s['model']}"
    _emit(args, s, f"exported {s['model']}\nvalidation on {s['val_patches']} patches ({s['val_source']}): "
                   f"{s['val_bpsp_before']} bits per sub-pixel before ({s['before']}), {s['val_coded_bpsp']} written "
                   f"after (float model {s['val_float_bpsp']}), exact round trip\n"
                   f"use it: wsi-idf pack SLIDE -o SLIDE.zarr {use}")
    return 0
