"""Deep Zoom tiles of an archive, as OpenSeadragon and OpenSlide's deepzoom server ask for them.

A Deep Zoom pyramid halves the image from its full size down to 1x1. A DZI level the same size
as an archive level is read from that level through the checked reader, so its PNG tiles are
the stored pixels exactly. A level between archive levels is made from the next finer source
(an archive level, or a preview level for the smallest ones) by box averaging, never from
level 0. Decoded chunks are kept in a small LRU cache, so neighbouring tiles do not decode a
chunk twice; a damaged chunk raises (the server answers that tile with an error), never pixels.
"""
from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from ..errors import ArchiveError

TILE = 254
OVERLAP = 1
FORMATS = ("png", "jpeg")
CACHE_BYTES = 192 * 2**20


class TileNotFound(ArchiveError):
    """A level, column or row beyond the slide."""


@dataclass(frozen=True)
class Source:
    """Where a DZI level's pixels come from: an archive level or a preview level, and its size."""
    kind: str  # "level" or "preview"
    index: int
    width: int
    height: int


class ChunkCache:
    """Decoded chunks (h, w, 3) by (source, index, chunk row, chunk column), least recently used out
    first, bounded in bytes; safe to share between request threads."""

    def __init__(self, max_bytes: int = CACHE_BYTES):
        self.max_bytes, self.bytes = max_bytes, 0
        self.items: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: tuple) -> np.ndarray | None:
        with self.lock:
            value = self.items.get(key)
            if value is not None:
                self.items.move_to_end(key)
            return value

    def put(self, key: tuple, value: np.ndarray) -> None:
        with self.lock:
            if key in self.items:
                return
            self.items[key] = value
            self.bytes += value.nbytes
            while self.bytes > self.max_bytes and self.items:
                _, old = self.items.popitem(last=False)
                self.bytes -= old.nbytes


class DeepZoom:
    """The Deep Zoom view of one open archive (``wsi_idf.open_archive``)."""

    def __init__(self, archive, cache: ChunkCache | None = None):
        self.archive = archive
        self.cache = cache or ChunkCache()
        self.width, self.height = archive.readers[0].width, archive.readers[0].height
        self.max_level = max(0, math.ceil(math.log2(max(self.width, self.height))))
        self.sources = [Source("level", i, r.width, r.height) for i, r in enumerate(archive.readers)]
        previews = archive.metadata.get("preview", {}).get("levels", 0)
        for k in range(previews):
            shape = _preview_shape(archive, k)
            if shape is not None:
                self.sources.append(Source("preview", k, shape[1], shape[0]))
        self._previews: dict[int, np.ndarray] = {}

    def dzi(self, fmt: str = "png") -> str:
        return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" '
                f'Format="{fmt}" Overlap="{OVERLAP}" TileSize="{TILE}"><Size Width="{self.width}" '
                f'Height="{self.height}"/></Image>\n')

    def level_size(self, level: int) -> tuple[int, int]:
        scale = 2 ** (self.max_level - level)
        return -(-self.width // scale), -(-self.height // scale)

    def tile_box(self, level: int, col: int, row: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of a tile in its level's pixels, overlap included."""
        if not 0 <= level <= self.max_level:
            raise TileNotFound(f"level {level} is not in 0..{self.max_level}")
        w, h = self.level_size(level)
        if not (0 <= col < -(-w // TILE) and 0 <= row < -(-h // TILE)):
            raise TileNotFound(f"tile {col}_{row} is outside level {level}")
        x0, y0 = max(0, col * TILE - OVERLAP), max(0, row * TILE - OVERLAP)
        return x0, y0, min(w, (col + 1) * TILE + OVERLAP), min(h, (row + 1) * TILE + OVERLAP)

    def source_for(self, level: int) -> tuple[Source, bool]:
        """The source a level is read from, and whether it is that source exactly (same size)."""
        w, h = self.level_size(level)
        for source in self.sources:
            if (source.width, source.height) == (w, h) and source.kind == "level":
                return source, True
        finer = [s for s in self.sources if s.width >= w and s.height >= h]
        return min(finer, key=lambda s: (s.width * s.height, s.kind != "level")), False

    def tile_pixels(self, level: int, col: int, row: int) -> tuple[np.ndarray, bool]:
        """(h, w, 3) uint8 pixels of a tile, and whether they are the stored pixels exactly."""
        x0, y0, x1, y1 = self.tile_box(level, col, row)
        source, exact = self.source_for(level)
        if exact:
            return self.region(source, x0, y0, x1 - x0, y1 - y0), True
        w, h = self.level_size(level)
        fx, fy = source.width / w, source.height / h
        sx0, sy0 = int(math.floor(x0 * fx)), int(math.floor(y0 * fy))
        sx1, sy1 = min(source.width, int(math.ceil(x1 * fx))), min(source.height, int(math.ceil(y1 * fy)))
        pixels = self.region(source, sx0, sy0, sx1 - sx0, sy1 - sy0)
        return shrink(pixels, (y1 - y0, x1 - x0)), False

    def tile(self, level: int, col: int, row: int, fmt: str) -> bytes:
        """A tile encoded as PNG (lossless) or JPEG."""
        from PIL import Image
        pixels, _ = self.tile_pixels(level, col, row)
        out = io.BytesIO()
        if fmt == "png":
            Image.fromarray(pixels).save(out, format="PNG", compress_level=1)
        else:
            Image.fromarray(pixels).save(out, format="JPEG", quality=90)
        return out.getvalue()

    def region(self, source: Source, x: int, y: int, width: int, height: int) -> np.ndarray:
        if source.kind == "preview":
            if source.index not in self._previews:
                self._previews[source.index] = np.ascontiguousarray(self.archive.preview(source.index).transpose(1, 2, 0))
            return self._previews[source.index][y:y + height, x:x + width]
        reader = self.archive.reader(source.index)
        side = reader.chunk
        rows = range(y // side, (y + height - 1) // side + 1)
        cols = range(x // side, (x + width - 1) // side + 1)
        key = (id(self), source.index)
        chunks = {(r, c): self.cache.get((*key, r, c)) for r in rows for c in cols}
        missing = [cell for cell, value in chunks.items() if value is None]
        if missing:
            r0, r1 = min(r for r, _ in missing), max(r for r, _ in missing) + 1
            c0, c1 = min(c for _, c in missing), max(c for _, c in missing) + 1
            bx, by = c0 * side, r0 * side
            block, _ = reader.region(bx, by, min(c1 * side, reader.width) - bx, min(r1 * side, reader.height) - by)
            for r in range(r0, r1):
                for c in range(c0, c1):
                    cell = np.ascontiguousarray(block[(r - r0) * side:(r - r0 + 1) * side,
                                                      (c - c0) * side:(c - c0 + 1) * side])
                    self.cache.put((*key, r, c), cell)
                    if (r, c) in chunks:
                        chunks[(r, c)] = cell
        out = np.empty((len(rows) * side, len(cols) * side, 3), dtype=np.uint8)
        for (r, c), cell in chunks.items():
            out[(r - rows[0]) * side:(r - rows[0]) * side + cell.shape[0],
                (c - cols[0]) * side:(c - cols[0]) * side + cell.shape[1]] = cell
        ox, oy = x - cols[0] * side, y - rows[0] * side
        return out[oy:oy + height, ox:ox + width]


def shrink(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Box-average ``pixels`` down to (h, w): a preview of pixels between archive levels."""
    from PIL import Image
    if pixels.shape[:2] == size:
        return pixels
    image = Image.fromarray(np.ascontiguousarray(pixels)).resize((size[1], size[0]), Image.Resampling.BOX)
    return np.asarray(image)


def _preview_shape(archive, level: int) -> tuple[int, int] | None:
    from ..archive.reader import check_small_array
    try:
        shape, _, _ = check_small_array(archive.path / "preview" / str(level), archive.zarr_format)
    except ArchiveError:
        return None
    return (shape[1], shape[2]) if len(shape) == 3 else None
