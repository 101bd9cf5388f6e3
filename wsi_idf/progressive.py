"""Progressive region reads: fetch only the coarse levels' bytes of each patch, decode a preview.

Version 2 patches store one rANS stream per flow level, coarsest first, so the first bytes of
each chunk decode the coarse levels alone. This reader uses the shard index to read, for every
patch a region touches, only the head of its chunk and the prefix that ``levels`` needs:
fewer bytes from disk (or object storage) and less decoding. Deflate, raw and version 1
patches are read whole and decode exactly.
"""
from __future__ import annotations

import struct
from pathlib import Path

import google_crc32c
import numpy as np

from .archive import check_region, open_archive
from .coding import decode_patches, preview_prefix
from .config import CHANNELS, PATCH
from .errors import ArchiveError

HEAD = 64  # bytes that always hold a patch's header and stream table


def _read(f, offset: int, size: int, counter: list[int]) -> bytes:
    f.seek(offset)
    data = f.read(size)
    counter[0] += len(data)
    return data


def _chunk_prefix(f, offset: int, nbytes: int, levels: int, counter: list[int]) -> bytes:
    head = _read(f, offset, min(nbytes, HEAD), counter)
    need = preview_prefix(head, levels)
    if need is None or need < 0 or need > nbytes:
        need = nbytes
    if need <= len(head):
        return head[:need]
    return head + _read(f, offset + len(head), need - len(head), counter)


def read_region(path: str | Path, level: int, x: int, y: int, width: int, height: int,
                levels: int | None = None) -> tuple[np.ndarray, int]:
    """Pixels of a region as (height, width, 3) uint8, decoded from ``levels`` flow levels
    (None: all, lossless), and the number of bytes read from the archive's chunk files."""
    archive = open_archive(path)
    if levels is not None:
        from .coding import check_levels
        from .registry import get_model
        model = archive.metadata["model"]
        check_levels(levels, get_model(model["name"], weights=model["weights"][:8]))
    meta = archive.metadata["levels"]
    if not 0 <= level < len(meta):
        raise ArchiveError(f"level {level} does not exist; the archive has levels 0..{len(meta) - 1}")
    lv = meta[level]
    check_region(level, x, y, width, height, lv["width"], lv["height"])
    shard = lv["shard"] if archive.zarr_format == 3 else PATCH
    per_side = shard // PATCH
    rows = range(y // PATCH, (y + height - 1) // PATCH + 1)
    cols = range(x // PATCH, (x + width - 1) // PATCH + 1)
    blobs: dict[tuple[int, int], bytes] = {}
    counter = [0]
    root = archive.path / lv["path"]
    for srow in sorted({r // per_side for r in rows}):
        for scol in sorted({c // per_side for c in cols}):
            wanted = [(r, c) for r in rows for c in cols if r // per_side == srow and c // per_side == scol]
            if archive.zarr_format == 3:
                _read_shard(root / "c" / "0" / str(srow) / str(scol), per_side, wanted, levels, blobs, counter)
            else:
                for r, c in wanted:
                    chunk = root / "0" / str(r) / str(c)
                    with open(chunk, "rb") as f:
                        blobs[(r, c)] = _chunk_prefix(f, 0, chunk.stat().st_size, levels or 99, counter)
    keys = sorted(blobs)
    patches = decode_patches([blobs[k] for k in keys], levels=levels)
    out = np.empty((len(rows) * PATCH, len(cols) * PATCH, CHANNELS), dtype=np.uint8)
    for (r, c), patch in zip(keys, patches):
        out[(r - rows[0]) * PATCH:(r - rows[0] + 1) * PATCH, (c - cols[0]) * PATCH:(c - cols[0] + 1) * PATCH] = \
            patch.transpose(1, 2, 0)
    y0, x0 = y - rows[0] * PATCH, x - cols[0] * PATCH
    return np.ascontiguousarray(out[y0:y0 + height, x0:x0 + width]), counter[0]


def _read_shard(path: Path, per_side: int, wanted: list[tuple[int, int]], levels: int | None,
                blobs: dict, counter: list[int]) -> None:
    cells = per_side * per_side
    index_size = 16 * cells + 4
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise ArchiveError(f"{path}: shard missing: the archive is incomplete or damaged") from None
    with f:
        size = f.seek(0, 2)
        if size < index_size:
            raise ArchiveError(f"{path}: shard is shorter than its index: it is damaged")
        raw = _read(f, size - index_size, index_size, counter)
        if google_crc32c.value(raw[:-4]) != struct.unpack("<I", raw[-4:])[0]:
            raise ArchiveError(f"{path}: shard index checksum mismatch: the shard is damaged")
        index = np.frombuffer(raw[:-4], dtype="<u8").reshape(per_side, per_side, 2)
        for r, c in wanted:
            offset, nbytes = (int(v) for v in index[r % per_side, c % per_side])
            if offset == 2**64 - 1 or offset + nbytes > size - index_size:
                raise ArchiveError(f"{path}: chunk ({r}, {c}) is missing or out of range: the shard is damaged")
            blobs[(r, c)] = _chunk_prefix(f, offset, nbytes, levels or 99, counter)
