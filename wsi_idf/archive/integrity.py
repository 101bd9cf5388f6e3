"""Checksums of the arrays that are not pyramid levels: previews, associated images, restore data.

Level patches carry their own CRC32C with their position. The zstd preview and associated
images cannot (a viewer without the ``wsi_idf`` codec reads them), so pack records, in the root
metadata, one CRC32C per chunk over the archive's id, the array's path, the chunk's coordinates
and its pixels (the part inside the array): a flipped byte, a chunk moved or swapped (two strips
of a macro), or a chunk copied from another archive fails its check in every wsi-idf reader and in
``verify``. Restore data records the sha256 of each file's skeleton and segment table.

Archives written before wsi-idf 0.5 have none of this and read as before.
"""
from __future__ import annotations

import hashlib
import json
import struct

import google_crc32c
import numpy as np

from ..errors import ArchiveError

ALGORITHM = "crc32c(archive id, array path, chunk coordinates, pixels in the array) per chunk, C order"


def plan_archive_id(plan: dict) -> str:
    """An archive's id (128 bits, hex), which enters every checksum's domain: the hash of its pack
    plan (the source's name, size and modification time, the model, weights, levels and layout,
    the wsi-idf version). Another slide, or the same file changed, gets another id, so a chunk of
    its archive (or a reader left open across an overwrite by it) fails its check; packing the same
    file the same way again gives the same archive, byte for byte (a resumed pack too)."""
    canonical = json.dumps({k: v for k, v in plan.items() if k != "archive_id"}, sort_keys=True).encode()
    return hashlib.sha256(b"wsi-idf archive id\0" + canonical).hexdigest()[:32]


def chunk_boxes(shape: tuple[int, ...], chunks: tuple[int, ...]) -> list[tuple[tuple[int, ...], tuple[slice, ...]]]:
    """Each chunk's coordinates and the part of the array it covers, C order."""
    grid = [range(-(-n // c)) for n, c in zip(shape, chunks)]
    return [(coords, tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(coords, chunks, shape)))
            for coords in np.ndindex(*(len(g) for g in grid))]


def chunk_checksum(archive_id: str, path: str, coords: tuple[int, ...], pixels: np.ndarray) -> int:
    domain = bytes.fromhex(archive_id) + path.encode() + struct.pack(f"<{len(coords)}I", *coords)
    return google_crc32c.extend(google_crc32c.value(domain), np.ascontiguousarray(pixels).tobytes())


def array_checksums(archive_id: str, path: str, image: np.ndarray, chunks: tuple[int, ...]) -> list[int]:
    """What pack records for an array written whole from ``image`` in ``chunks``."""
    return [chunk_checksum(archive_id, path, coords, image[box]) for coords, box in chunk_boxes(image.shape, chunks)]


def expected_checksums(meta: dict, path: str, count: int) -> list[int] | None:
    """An array's recorded checksums (None for archives written before they were recorded); a
    record of the wrong form or length is damage."""
    record = meta.get("checksums")
    if record is None:
        return None
    arrays = record.get("arrays") if isinstance(record, dict) else None
    values = arrays.get(path) if isinstance(arrays, dict) else None
    if not isinstance(values, list) or len(values) != count \
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32 for v in values):
        raise ArchiveError(f"{path}: its checksums in the archive metadata are missing or damaged")
    return values


def check_chunk(archive_id: str | None, path: str, coords: tuple[int, ...], pixels: np.ndarray,
                expected: int | None, where: object) -> None:
    if expected is not None and chunk_checksum(archive_id, path, coords, pixels) != expected:
        raise ArchiveError(f"{where}: chunk {coords} does not match its checksum (damaged, moved, or from another "
                           "archive): the archive is damaged")
