"""The ``wsi-idf`` command line: thin subcommands over library functions.

Exit codes: 0 success, 1 a wsi-idf error (bad input, damaged data, weights mismatch),
2 usage error, 3 verification failed, 130 interrupted.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ._version import __version__
from .commands import (cmd_demo, cmd_info, cmd_models, cmd_pack, cmd_region, cmd_restore, cmd_serve,
                       cmd_train, cmd_unpack, cmd_verify)
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


def _shipped_weights(name: str) -> str:
    """The shipped weights file of a registered model, as a path a user can pass (for help texts)."""
    from .coding.registry import WEIGHTS_DIR, entry
    return str(WEIGHTS_DIR / entry(name).weights)


def _resources(text: str) -> dict[str, float]:
    try:
        return {name.strip(): float(value) for name, value in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=N[,NAME=N], e.g. GPU=1, got {text!r}") from None


def adapt_budget(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected minutes or auto, got {text!r}") from None
    if not 0 < value <= 600:
        raise argparse.ArgumentTypeError(f"minutes must be above 0 and at most 600, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_coding_options(p: argparse.ArgumentParser) -> None:
    """How slides are coded: the options ``pack`` and the batch job (``pipelines/archive_batch.py``) share."""
    p.add_argument("--model", default=None, metavar="NAME|FILE",
                   help="a built-in model, a model in the user models folder, or a model file's path (see `wsi-idf "
                        "models`; default: fast). The archive carries the model's weights (~0.4 MB per IDF-coded "
                        "level), so it decodes wherever wsi-idf is installed")
    p.add_argument("--adapt", type=adapt_budget, default=None, metavar="MINUTES|auto",
                   help="first fine-tune the model on this slide for MINUTES (wall time, on the coding device), "
                        "and code with it if it writes fewer bytes on held-out regions of the slide; auto: a "
                        "budget by slide size (none below 50 Mpx coded with the IDF)")
    p.add_argument("--adapt-steps", type=_positive_int, default=None, metavar="N",
                   help="adapt for exactly N steps instead of a time budget: the same weights on every run")
    p.add_argument("--adapt-seed", type=int, default=0, help="seed of the adaptation (regions, crops; default 0)")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda or cuda:N")
    p.add_argument("--codec", choices=["auto", "idf", "source"], default="auto",
                   help="auto (default): keep the slide's own tiles where they are lossy (JPEG, recompressed "
                        "losslessly with JPEG XL; JPEG 2000 as is), pixel-exact and smaller than the source, and "
                        "code other levels with the IDF; idf: code every level's pixels with the IDF; source: "
                        "keep every level's tiles or refuse")
    p.add_argument("--drop-label", action="store_true", help="leave out the label image (it may carry patient "
                                                             "identifiers)")
    p.add_argument("--restorable", action="store_true",
                   help="also keep the bytes of levels coded from their pixels (deflate, LZW, OpenSlide-read "
                        "formats), so that `wsi-idf restore` gives the source file back: a larger archive. "
                        "Archives whose levels all keep their tiles are restorable without it")


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
    add_coding_options(p)
    p.add_argument("--backend", default="auto", choices=["auto", "tifffile", "openslide"],
                   help="slide reader (auto: tifffile for TIFF-based files, else OpenSlide)")
    p.add_argument("--shard", type=int, default=1280, help="shard side in pixels, a multiple of 80 (default 1280)")
    p.add_argument("--zarr-format", type=int, choices=[2, 3], default=3,
                   help="3 (default, sharded, OME-NGFF 0.5) or 2 (one file per patch, OME-NGFF 0.4)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing wsi-idf archive, once the new "
                                                            "one is complete (never a file or another folder)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted pack of the same slide")
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
                                   "The model is exported into the user models folder (--export-to), where "
                                   "`wsi-idf pack --model NAME` and `wsi-idf models` find it; every archive "
                                   "carries the weights it was coded with.\n\n"
                                   "Fine-tune the shipped model on a lab's own slides (current base weights: "
                                   f"{_shipped_weights('fast')}):\n"
                                   "  wsi-idf train lab-he --init-from fast --data /lab/slides --minutes 60\n"
                                   "  wsi-idf pack slide.svs -o slide.zarr --model lab-he")
    p.add_argument("model", help="the name of the exported model (letters, digits, _+-); a built-in configuration "
                                 "(fast) or candidate (max, grown from fast with --grow-from) when training from "
                                 "scratch")
    p.add_argument("--data", action="append", type=Path, default=None,
                   help="folder (or file) of tiles and/or slides; repeatable (default: the shared train tiles)")
    p.add_argument("--val", action="append", type=Path, default=None,
                   help="validation folder (default: the shared val tiles when --data is not given; else a tenth "
                        "of the training tiles, or the bottom tenth of each slide's rows, left out of training)")
    p.add_argument("--out", type=Path, default=Path("checkpoints"), help="checkpoints and log (default checkpoints/)")
    p.add_argument("--export-to", type=Path, default=None, metavar="DIR",
                   help="where the exported model goes (default: the user models folder, WSI_IDF_MODELS)")
    p.add_argument("--init-from", default=None, metavar="NAME|FILE",
                   help="a model to fine-tune (its float weights): a built-in or user model name, or a model file")
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
