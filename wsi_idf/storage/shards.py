"""Shard geometry and the Zarr v3 shard object, built whole so a pipeline writes each shard once.

A level is a (3, H, W) array of 80x80 inner chunks grouped into square shards. A shard object
is the inner chunks' bytes, then an index of little-endian uint64 (offset, nbytes) pairs per
inner chunk in C order (2^64-1 twice for a chunk that is absent), then the CRC32C of the index:
the layout zarr's ``sharding_indexed`` codec reads with its default index codecs.
"""
from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import google_crc32c
import numpy as np

from ..config import CHANNELS, PATCH
from ..errors import ArchiveError

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


@dataclass(frozen=True)
class ShardIndex:
    """The index at the end of a shard object: little-endian uint64 (offset, nbytes) per inner chunk
    in C order (2^64-1 twice where absent), then its CRC32C: zarr's ``sharding_indexed`` layout with
    its default index codecs, as ``build_shard`` writes it."""

    entries: np.ndarray  # (cells, 2) uint64

    @staticmethod
    def nbytes(cells: int) -> int:
        return 16 * cells + 4

    @classmethod
    def parse(cls, raw: bytes, cells: int) -> ShardIndex:
        """The index from its bytes (the last ``nbytes(cells)`` of a shard); checks its CRC32C."""
        if len(raw) != cls.nbytes(cells):
            raise ArchiveError(f"shard index of {len(raw)} bytes, expected {cls.nbytes(cells)}: the shard is damaged")
        if google_crc32c.value(raw[:-4]) != struct.unpack("<I", raw[-4:])[0]:
            raise ArchiveError("shard index checksum mismatch: the shard is damaged")
        return cls(np.frombuffer(raw[:-4], dtype="<u8").reshape(cells, 2))

    def check_layout(self, present: np.ndarray, data_size: int, max_chunk: int) -> None:
        """Refuse anything but what ``build_shard`` writes: exactly the ``present`` cells (C order),
        none larger than ``max_chunk``, back to back from offset 0 to ``data_size``. A forged index
        with a valid CRC (out of the file, aliased, huge) is then damage, not zeros or a wrong patch."""
        present = present.ravel()
        offsets, sizes = self.entries[:, 0], self.entries[:, 1]
        if np.any(offsets[~present] != EMPTY) or np.any(offsets[present] == EMPTY):
            raise ArchiveError("shard index has chunks missing or outside the level: the shard is damaged")
        sizes_in = sizes[present]
        if np.any(sizes_in == 0) or np.any(sizes_in > max_chunk):
            raise ArchiveError("shard index gives a chunk an impossible size: the shard is damaged")
        ends = np.concatenate([[0], np.cumsum(sizes_in)])
        if np.any(offsets[present] != ends[:-1]) or int(ends[-1]) != data_size:
            raise ArchiveError("shard index does not describe its chunks back to back: the shard is damaged or forged")

    def chunk(self, cell: int) -> tuple[int, int] | None:
        """(offset, nbytes) of a cell's chunk, None where absent."""
        offset, nbytes = (int(v) for v in self.entries[cell])
        return None if offset == EMPTY else (offset, nbytes)


def shard_chunks(data: bytes, cells: int) -> Iterator[bytes | None]:
    """The inner chunks of a shard object in C order (None where absent); checks the index CRC."""
    index_size = ShardIndex.nbytes(cells)
    if len(data) < index_size:
        raise ArchiveError(f"shard object of {len(data)} bytes is shorter than its index")
    index = ShardIndex.parse(data[-index_size:], cells)
    for cell in range(cells):
        where = index.chunk(cell)
        if where is None:
            yield None
        elif where[0] + where[1] > len(data) - index_size:
            raise ArchiveError("shard index points past the chunk data: the shard is damaged")
        else:
            yield data[where[0]:where[0] + where[1]]
