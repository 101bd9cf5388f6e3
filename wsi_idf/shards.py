"""Shard geometry and the Zarr v3 shard object, built whole so a pipeline writes each shard once.

A level is a (3, H, W) array of 80x80 inner chunks grouped into square shards. A shard object
is the inner chunks' bytes, then an index of little-endian uint64 (offset, nbytes) pairs per
inner chunk in C order (2^64-1 twice for a chunk that is absent), then the CRC32C of the index:
the layout zarr's ``sharding_indexed`` codec reads with its default index codecs.
"""
from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import google_crc32c
import numpy as np

from .config import CHANNELS, PATCH
from .errors import ArchiveError

EMPTY = np.uint64(2**64 - 1)
DEFAULT_SHARD = 1280  # 16 x 16 patches: one encode batch of 256 patches, ~5 MB of raw pixels


@dataclass(frozen=True)
class ShardBox:
    """One shard of one level: its grid position and the pixel box it covers inside the level."""
    level: int
    row: int
    col: int
    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def name(self) -> str:
        return f"{self.level}/{self.row}.{self.col}"


def shard_boxes(level: int, height: int, width: int, shard: int) -> list[ShardBox]:
    """The shards of a level in C order, clipped to the level's true size."""
    return [ShardBox(level, r, c, y, min(y + shard, height), x, min(x + shard, width))
            for r, y in enumerate(range(0, height, shard)) for c, x in enumerate(range(0, width, shard))]


def cut_patches(region: np.ndarray, shard: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut an (h, w, 3) region into the (n, 3, 80, 80) patches that touch it, C order over the shard grid.

    Returns the patches and a boolean (shard/80, shard/80) map of which inner chunks exist.
    Edge patches are padded by repeating the last row/column: zarr never returns the padding,
    and repeated pixels cost fewer bits than a constant fill.
    """
    h, w, _ = region.shape
    rows, cols = -(-h // PATCH), -(-w // PATCH)
    padded = np.pad(region, ((0, rows * PATCH - h), (0, cols * PATCH - w), (0, 0)), mode="edge")
    patches = padded.reshape(rows, PATCH, cols, PATCH, CHANNELS).transpose(0, 2, 4, 1, 3)
    present = np.zeros((shard // PATCH, shard // PATCH), dtype=bool)
    present[:rows, :cols] = True
    return np.ascontiguousarray(patches.reshape(-1, CHANNELS, PATCH, PATCH)), present


def build_shard(blobs: Sequence[bytes], present: np.ndarray) -> bytes:
    """The shard object for encoded inner chunks ``blobs`` (C order over the ``present`` cells)."""
    index = np.full(present.shape + (2,), EMPTY, dtype="<u8")
    flat = index.reshape(1, -1, 2)[0]
    offset = 0
    for cell, blob in zip(np.flatnonzero(present.ravel()), blobs, strict=True):
        flat[cell] = (offset, len(blob))
        offset += len(blob)
    index_bytes = index.reshape((1,) + index.shape).tobytes()  # leading channel axis: one shard spans c
    return b"".join(blobs) + index_bytes + struct.pack("<I", google_crc32c.value(index_bytes))


def shard_chunks(data: bytes, cells: int) -> Iterator[bytes | None]:
    """The inner chunks of a shard object in C order (None where absent); checks the index CRC."""
    index_size = cells * 16 + 4
    if len(data) < index_size:
        raise ArchiveError(f"shard object of {len(data)} bytes is shorter than its index")
    index_bytes, crc = data[-index_size:-4], struct.unpack("<I", data[-4:])[0]
    if google_crc32c.value(index_bytes) != crc:
        raise ArchiveError("shard index checksum mismatch: the shard is damaged")
    index = np.frombuffer(index_bytes, dtype="<u8").reshape(cells, 2)
    for offset, nbytes in index:
        if offset == EMPTY:
            yield None
        elif offset + nbytes > len(data) - index_size:
            raise ArchiveError("shard index points past the chunk data: the shard is damaged")
        else:
            yield data[int(offset):int(offset + nbytes)]


def region_digest(region: np.ndarray) -> bytes:
    """sha256 of an (h, w, 3) region's interleaved RGB bytes: the unit of the level checksums."""
    return hashlib.sha256(np.ascontiguousarray(region).tobytes()).digest()


def level_checksum(digests: Sequence[bytes]) -> str:
    """sha256 over the shard digests in C order: computable shard by shard, in parallel."""
    return hashlib.sha256(b"".join(digests)).hexdigest()
