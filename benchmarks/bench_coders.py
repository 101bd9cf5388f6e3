"""Entropy coders side by side on real latents (issue 13: >= 6 Mpx/s per core, encode and decode).

Codes the split latents of real val patches (the shipped model's priors and 24-bit tables), one
stream per patch, on one thread, with
- constriction as wsi-idf calls it (one prebuilt Categorical per table row, one call per row), on
  all of a patch's split latents at once, and wsi-idf's whole per-patch encode path for context;
- wsi-idf's compiled twin of those calls (``wsi_idf.coding._rans``), checked to write the same bytes, on
  the whole path: every stream slot of the batch in one call, and the decode path's pop per pass;
- a ~100-line table-indexed rANS in C with the tables resident (``rans_prototype.c``, compiled
  here with the system C compiler; skipped without one), checked to round-trip exactly.
Prints symbols/s and the Mpx/s they mean (3 sub-pixels a pixel), and the stream sizes.

    python benchmarks/bench_coders.py --patches 256
"""
from __future__ import annotations

import argparse
import ctypes
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from wsi_idf.coding.entropy import pop, push
from wsi_idf.coding.latent_streams import LatentStreams
from wsi_idf.coding.registry import get_model
from wsi_idf.model.data import data_dir, grid_patches, load_tiles

HERE = Path(__file__).resolve().parent


def compile_prototype(work: Path):
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    lib = work / "rans_prototype.so"
    subprocess.run([compiler, "-O2", "-shared", "-fPIC", str(HERE / "rans_prototype.c"), "-o", str(lib)], check=True)
    c = ctypes.CDLL(str(lib))
    p = ctypes.c_void_p
    c.rans_encode.argtypes = [p, p, p, ctypes.c_int64, p, ctypes.c_int32, ctypes.c_int32, p, ctypes.c_int64]
    c.rans_decode.argtypes = [p, ctypes.c_int64, p, p, ctypes.c_int64, p, ctypes.c_int32, ctypes.c_int32, p]
    c.rans_encode.restype = c.rans_decode.restype = ctypes.c_int64
    return c


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patches", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    patches = grid_patches(load_tiles(data_dir() / "tiles" / "val"))
    patches = np.ascontiguousarray(patches[:: max(1, len(patches) // args.patches)][: args.patches])
    model = get_model("fast")
    streams = LatentStreams(model)
    lat = streams.latents(patches)
    tables = streams.split_tables
    per_patch = [(np.concatenate([o[i].ravel() for o in lat.outs]),
                  np.concatenate([p[0][i].ravel() for p in lat.priors]).astype(np.int32),
                  np.concatenate([p[1][i].ravel() for p in lat.priors])) for i in range(len(patches))]
    symbols = sum(len(v) for v, _, _ in per_patch)
    rows = []

    import constriction
    t = time.perf_counter()
    coded = []
    for v, r, c in per_patch:
        coder = constriction.stream.stack.AnsCoder()
        push(coder, tables, v, r, c)
        coded.append(coder.get_compressed())
    enc = time.perf_counter() - t
    t = time.perf_counter()
    for (v, r, c), words in zip(per_patch, coded):
        assert np.array_equal(pop(constriction.stream.stack.AnsCoder(words), tables, r, c), v)
    dec = time.perf_counter() - t
    rows.append(("constriction, one call per table row, one stream", enc, dec, sum(w.nbytes for w in coded)))
    t = time.perf_counter()
    payloads = [streams.encode(lat, i) for i in range(len(patches))]
    rows.append(("constriction on the whole path (the fallback): LatentStreams.encode per patch (top + per-pass calls, framing)",
                 time.perf_counter() - t, float("nan"), sum(len(b) for b in payloads)))

    from wsi_idf.coding import compiled_rans
    if compiled_rans.AVAILABLE:
        streams.encode_batch(lat)  # warm (tables quantized once per model)
        t = time.perf_counter()
        payloads_c = streams.encode_batch(lat)
        enc = time.perf_counter() - t
        assert payloads_c == payloads, "the compiled coder must write constriction's bytes"
        from wsi_idf.coding import patch_format as fmt
        levels = len(lat.outs)
        words = [fmt.unpack_streams(memoryview(b), levels + 1, levels + 1) for b in payloads_c]
        t = time.perf_counter()
        decoders = [compiled_rans.StreamDecoders([w[j] for w in words]) for j in range(levels + 1)]
        top_rows, top_centres = streams.top_priors(lat.top.shape[1:])
        n = len(patches)
        top = decoders[0].pop(streams.top_tables.compiled, np.broadcast_to(top_rows, (n, top_rows.size)),
                              np.broadcast_to(top_centres, (n, top_rows.size)))
        popped = [top]
        for k, level in enumerate(reversed(range(levels))):  # the decode path's calls: a pop per pass
            r, c = (a.reshape(n, -1) for a in lat.priors[level])
            out = np.zeros(r.shape, dtype=np.int64)
            for mask in streams.flow.pass_masks(lat.outs[level].shape[1:]):
                decoders[k + 1].pop(streams.split_tables.compiled, r, c, np.flatnonzero(mask), out)
            popped.append(out)
        dec = time.perf_counter() - t
        assert np.array_equal(top, lat.top.reshape(n, -1))
        assert all(np.array_equal(o, lat.outs[level].reshape(n, -1))
                   for o, level in zip(popped[1:], reversed(range(levels))))
        rows.append(("compiled twin (wsi_idf.coding._rans), whole path: encode_batch / a pop per pass, all streams",
                     enc, dec, sum(len(b) for b in payloads_c)))

    from safetensors.numpy import load_file
    from wsi_idf.coding.registry import weights_file
    freq = load_file(str(weights_file("fast", model.sha256)))["split_freq"].astype(np.int64)
    cdf = np.zeros((freq.shape[0], freq.shape[1] + 1), np.uint32)
    cdf[:, 1:] = np.cumsum(freq, axis=1)
    with tempfile.TemporaryDirectory() as work:
        c_lib = compile_prototype(Path(work))
        if c_lib is not None:
            alphabet, window = freq.shape[1], tables.window
            ptr = lambda a: a.ctypes.data  # noqa: E731
            out = np.empty(2 * 80 * 80 * 3 + 64, np.uint32)
            t = time.perf_counter()
            blobs = []
            for v, r, c in per_patch:
                n = c_lib.rans_encode(ptr(v), ptr(r), ptr(c), len(v), ptr(cdf), alphabet, window, ptr(out), len(out))
                assert n > 0
                blobs.append(out[:n].copy())
            enc = time.perf_counter() - t
            back = np.empty(len(per_patch[0][0]), np.int64)
            t = time.perf_counter()
            for (v, r, c), words in zip(per_patch, blobs):
                assert c_lib.rans_decode(ptr(words), len(words), ptr(r), ptr(c), len(v), ptr(cdf), alphabet, window,
                                         ptr(back)) == 0
                assert np.array_equal(back[:len(v)], v)
            dec = time.perf_counter() - t
            rows.append(("C prototype, tables resident (rans_prototype.c)", enc, dec, sum(b.nbytes for b in blobs)))
    print(f"{len(patches)} real val patches, split latents of model {model.name} ({symbols:,} symbols), one thread\n")
    print("| coder | encode M symbols/s | decode M symbols/s | encode Mpx/s | decode Mpx/s | bytes |")
    print("|---|---|---|---|---|---|")
    for name, enc, dec, size in rows:
        print(f"| {name} | {symbols / enc / 1e6:.1f} | {symbols / dec / 1e6:.1f} | {symbols / 3 / enc / 1e6:.2f} | "
              f"{symbols / 3 / dec / 1e6:.2f} | {size:,} |".replace("nan", "-"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
