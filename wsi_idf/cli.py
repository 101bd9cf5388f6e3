"""The ``wsi-idf`` command line: thin subcommands over library functions.

Exit codes: 0 success, 1 a wsi-idf error (bad input, damaged data, weights mismatch),
2 usage error, 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence

from . import __version__
from .errors import WsiIdfError

log = logging.getLogger("wsi_idf")

EPILOG = """exit codes:
  0   success
  1   a wsi-idf error: unreadable or unsupported input, damaged data, model weights mismatch
  2   usage error
  130 interrupted
"""


def cmd_models(args: argparse.Namespace) -> int:
    from dataclasses import asdict
    from .registry import DEFAULT_MODEL, MODELS, WEIGHTS_DIR
    rows = [{"name": e.name, "default": e.name == DEFAULT_MODEL, "weights": e.weights,
             "installed": (WEIGHTS_DIR / e.weights).exists(), "config": asdict(e.config),
             "description": e.description} for e in MODELS.values()]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            mark = "*" if r["default"] else " "
            print(f"{mark} {r['name']:6s} {r['weights']:28s} {r['description']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np
    from .coding import decode_patches, encode_patches
    from .data import data_dir, grid_patches, load_tiles
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.ERROR if args.quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="wsi-idf: %(message)s")
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
