"""wsi-idf's own reader of a coded level: the checks plain zarr cannot make.

Plain zarr reads a missing shard, an empty one or an index entry past the end of a file as
fill value (zeros), and cannot tell a chunk moved to another place. This reader reads chunk
bytes from the shard files itself and refuses all of those:

- every chunk of the level's grid exists (wsi-idf writes every one), so a missing or empty
  shard file or chunk file is damage;
- a shard index is exactly what ``shards.build_shard`` writes: its CRC32C, every cell inside
  the level present, none outside, chunks back to back in C order up to the index, each no
  larger than a stored patch can be (so no entry makes it read or allocate more);
- each patch decodes with the archive's own weights, and (archive format 2) was written for
  the position it is found at.

``region``, ``unpack``, ``verify``, progressive previews and ``open_archive``'s Dask levels all
read through it, so they agree with each other and with ``verify``.
"""
from __future__ import annotations

import re
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..coding import patch_format as fmt
from ..config import CHANNELS, PATCH
from ..errors import ArchiveError, CorruptPatchError, DamagedArchiveError, WeightsMismatchError, WsiIdfError
from ..storage.shards import ShardIndex
from ..storage.zarr_formats import FORMATS, ZarrFormat

if TYPE_CHECKING:
    from ..coding.model_file import CodingModel

HEAD = 64  # bytes that always hold a patch's header and stream table
MAX_PATCH_BYTES = fmt.RAW_BYTES + fmt.HEADER.size + fmt.POSITION.size  # the encoder never writes more


@dataclass(frozen=True)
class LevelReader:
    """Reads one level of an open archive; ``shard`` is the shard side in pixels (v3) or the task
    size (v2, one file per 80x80 chunk)."""

    root: Path  # the level's folder
    level: int
    height: int
    width: int
    shard: int
    zarr_format: int
    model: CodingModel | None  # pinned: the archive's weights (None: every level keeps source tiles)
    bound: bool  # patches carry their positions (archive format 2)
    storage: str = "idf"  # or "source": the slide's own tiles (``source_tiles``)
    chunk: int = PATCH  # chunk side: 80 for IDF patches, the tile side for source tiles
    archive_id: bytes | None = None  # archives of wsi-idf 0.5 on: every chunk's checksum covers it
    source_codec: str | None = None  # what the metadata says a source level's tiles are

    @property
    def grid(self) -> tuple[int, int]:
        """Chunk rows and columns of the level."""
        return -(-self.height // self.chunk), -(-self.width // self.chunk)

    @property
    def max_chunk_bytes(self) -> int:
        """No stored chunk is larger: the IDF encoder never exceeds raw + header; a kept JPEG or
        JPEG 2000 tile is taken to be at most twice its raw pixels."""
        from ..storage.source_tiles import max_chunk_bytes
        return MAX_PATCH_BYTES if self.storage == "idf" else max_chunk_bytes(self.chunk, self.chunk)

    @property
    def format(self) -> ZarrFormat:
        return FORMATS[self.zarr_format]

    def shard_path(self, srow: int, scol: int) -> Path:
        """The file of shard (srow, scol) (v3), or of chunk (srow, scol) (v2: one file per chunk)."""
        return self.format.chunk_file(self.root.parent, self.level, srow, scol)

    def region(self, x: int, y: int, width: int, height: int,
               flow_levels: int | None = None) -> tuple[np.ndarray, int]:
        """Pixels of a region as (height, width, 3) uint8 and the bytes read from chunk files.
        ``flow_levels`` below the model's decodes a preview from the coarse flow levels' bytes only."""
        from ..coding.batch import check_levels
        check_region(self.level, x, y, width, height, self.width, self.height)
        check_levels(flow_levels, self.model)
        side = self.chunk
        if self.storage == "source":
            flow_levels = None  # kept tiles have no flow levels: always exact
        rows = range(y // side, (y + height - 1) // side + 1)
        cols = range(x // side, (x + width - 1) // side + 1)
        blobs, counter = self.chunks(rows, cols, flow_levels)
        keys = sorted(blobs)
        patches = self.decode([blobs[k] for k in keys], keys, flow_levels)
        out = np.empty((len(rows) * side, len(cols) * side, CHANNELS), dtype=np.uint8)
        for (r, c), patch in zip(keys, patches):
            out[(r - rows[0]) * side:(r - rows[0] + 1) * side,
                (c - cols[0]) * side:(c - cols[0] + 1) * side] = patch.transpose(1, 2, 0)
        y0, x0 = y - rows[0] * side, x - cols[0] * side
        return np.ascontiguousarray(out[y0:y0 + height, x0:x0 + width]), counter

    def decode(self, blobs: list[bytes], cells: list[tuple[int, int]], flow_levels: int | None = None) -> np.ndarray:
        """Decode chunks found at ``cells`` with the archive's weights; damage raises ``CorruptPatchError``
        naming the patch's level and pixel position."""
        from ..coding.batch import decode_patches
        positions = [(self.level, r, c) for r, c in cells] if self.bound else None
        try:
            if self.storage == "source":
                from ..storage.source_tiles import chunk_codec, decode_chunk
                shape = (CHANNELS, self.chunk, self.chunk)
                out = np.empty((len(blobs), *shape), dtype=np.uint8)
                for i, (blob, (r, c)) in enumerate(zip(blobs, cells)):
                    try:
                        if self.source_codec is not None and chunk_codec(blob) != self.source_codec:
                            raise CorruptPatchError(f"it holds {chunk_codec(blob)} data where the archive metadata says "
                                                    f"the level's tiles are {self.source_codec} (one of them is damaged)")
                        out[i] = decode_chunk(blob, shape, (self.level, r, c), check_position=self.bound,
                                              archive_id=self.archive_id)
                    except CorruptPatchError as exc:
                        exc.index = i
                        raise
                return out
            return decode_patches(blobs, model=self.model, levels=flow_levels, positions=positions,
                                  archive_id=self.archive_id)
        except (CorruptPatchError, WeightsMismatchError) as exc:
            r, c = cells[exc.index] if getattr(exc, "index", None) is not None else (None, None)
            where = f"{'tile' if self.storage == 'source' else 'patch'} x={c * self.chunk}, y={r * self.chunk}" \
                if r is not None else "a patch"
            reason = damage_reason(str(exc)) if isinstance(exc, CorruptPatchError) else \
                f"it names other weights than its archive ({exc})"
            raise CorruptPatchError(f"level {self.level} {where} is damaged: {reason}") from None

    def chunks(self, rows: range, cols: range, flow_levels: int | None = None) -> tuple[dict, int]:
        """The stored bytes of chunks ``rows`` x ``cols`` (only a preview's prefix with ``flow_levels``)."""
        blobs: dict[tuple[int, int], bytes] = {}
        counter = [0]
        if not self.format.sharded:
            for r in rows:
                for c in cols:
                    path = self.shard_path(r, c)
                    try:
                        with open(path, "rb") as f:
                            size = f.seek(0, 2)
                            if not 0 < size <= self.max_chunk_bytes:
                                raise ArchiveError(f"{path}: chunk file of {size} bytes: it is damaged")
                            blobs[(r, c)] = _chunk_prefix(f, 0, size, flow_levels, counter)
                    except FileNotFoundError:
                        raise ArchiveError(f"{path}: chunk file missing: the archive is damaged") from None
            return blobs, counter[0]
        per_side = self.shard // self.chunk
        for srow in sorted({r // per_side for r in rows}):
            for scol in sorted({c // per_side for c in cols}):
                wanted = [(r, c) for r in rows for c in cols if r // per_side == srow and c // per_side == scol]
                self._read_shard(srow, scol, wanted, flow_levels, blobs, counter)
        return blobs, counter[0]

    def shard_index(self, srow: int, scol: int, f, size: int, counter: list[int]) -> ShardIndex:
        """The checked index of one open shard file (``ShardIndex.check_layout``)."""
        path = self.shard_path(srow, scol)
        per_side = self.shard // self.chunk
        index_size = ShardIndex.nbytes(per_side * per_side)
        if size < index_size:
            raise ArchiveError(f"{path}: shard file of {size} bytes is shorter than its index: it is damaged")
        rows, cols = self.grid
        inside = np.zeros((per_side, per_side), dtype=bool)
        inside[:max(0, rows - srow * per_side), :max(0, cols - scol * per_side)] = True
        try:
            index = ShardIndex.parse(_read(f, size - index_size, index_size, counter), per_side * per_side)
            index.check_layout(inside, size - index_size, self.max_chunk_bytes)
        except ArchiveError as exc:
            raise ArchiveError(f"{path}: {exc}") from None
        return index

    def _read_shard(self, srow: int, scol: int, wanted: list[tuple[int, int]], flow_levels: int | None,
                    blobs: dict, counter: list[int]) -> None:
        path = self.shard_path(srow, scol)
        per_side = self.shard // self.chunk
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise ArchiveError(f"{path}: shard file missing: the archive is damaged") from None
        with f:
            size = f.seek(0, 2)
            index = self.shard_index(srow, scol, f, size, counter)
            for r, c in wanted:
                offset, nbytes = index.chunk((r % per_side) * per_side + c % per_side)
                blobs[(r, c)] = _chunk_prefix(f, offset, nbytes, flow_levels, counter)


def damage_reason(message: str) -> str:
    """What is wrong with a chunk, without the decoder's own "patch 3 is damaged: " prefix or a
    trailing "it is damaged" (the caller names the chunk and says it is damaged once)."""
    message = re.sub(r"^(patch \d+|source chunk) (is damaged|cannot be checked)( or hostile)?: ", "", message)
    return re.sub(r"[:,]? (it|the chunk) is damaged$", "", message) or message


def flow_levels_arg(flow_levels: int | None, levels: int | None) -> int | None:
    """``levels=`` is wsi-idf 0.3's name for ``flow_levels=`` (beside a pyramid ``level`` it misled); both work."""
    if levels is not None and flow_levels is not None and levels != flow_levels:
        raise ArchiveError(f"flow_levels={flow_levels} and levels={levels} disagree (levels is the older name)")
    return flow_levels if flow_levels is not None else levels


def check_region(level: int, x: int, y: int, width: int, height: int, level_width: int, level_height: int) -> None:
    """A region must lie inside its level: unlike OpenSlide, wsi-idf does not pad with background."""
    if not (0 <= x and 0 <= y and width > 0 and height > 0 and x + width <= level_width
            and y + height <= level_height):
        raise ArchiveError(f"region x={x} y={y} {width}x{height} is outside level {level} ({level_width}x"
                           f"{level_height}); wsi-idf returns only stored pixels (OpenSlide would pad with "
                           "background): clip the region to the level")


def _read(f, offset: int, size: int, counter: list[int]) -> bytes:
    f.seek(offset)
    data = f.read(size)
    counter[0] += len(data)
    return data


def _chunk_prefix(f, offset: int, nbytes: int, flow_levels: int | None, counter: list[int]) -> bytes:
    """A chunk's bytes, or with ``flow_levels`` only the prefix a preview of that many flow levels needs."""
    from ..coding.batch import preview_prefix
    if flow_levels is None:
        return _read(f, offset, nbytes, counter)
    head = _read(f, offset, min(nbytes, HEAD), counter)
    try:
        need = preview_prefix(head, flow_levels)
    except CorruptPatchError:
        need = None  # read it whole; decoding names the damage
    if need is None or need < 0 or need > nbytes:
        need = nbytes
    if need <= len(head):
        return head[:need]
    return head + _read(f, offset + len(head), need - len(head), counter)


MAX_SMALL_IMAGE_BYTES = 2**28  # preview levels and associated images (a macro is ~10 MB)


MAX_METADATA_BYTES = 2**24


def read_json(path: Path) -> dict:
    """A metadata file, bounded in size; damage is an ArchiveError."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_METADATA_BYTES + 1)
        if len(data) > MAX_METADATA_BYTES:
            raise ValueError(f"larger than {MAX_METADATA_BYTES} bytes")
        value = json.loads(data)
    except FileNotFoundError:
        raise DamagedArchiveError(f"{path}: missing: the archive is damaged or incomplete") from None
    except (OSError, ValueError, RecursionError) as exc:
        raise DamagedArchiveError(f"{path}: unreadable metadata ({str(exc)[:100]}): the archive is damaged") from None
    if not isinstance(value, dict):
        raise DamagedArchiveError(f"{path}: metadata is not a JSON object: the archive is damaged")
    return value


def check_small_array(folder: Path, zarr_format: int) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
    """Shape and chunks of a preview or associated array (and whether the wsi_idf codec keeps it),
    refused unless it is uint8 as wsi-idf writes it and small: a crafted one must not make a reader
    allocate without bound."""
    fmt = FORMATS[zarr_format]
    layout = fmt.small_array_layout(read_json(folder / fmt.array_file))
    shape, chunks, kept = layout if layout is not None else (None, None, False)
    valid = lambda v: (isinstance(v, list) and 1 <= len(v) <= 3
                       and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in v))
    if layout is None or not valid(shape) or not valid(chunks) or len(chunks) != len(shape) \
            or int(np.prod(shape, dtype=object)) > MAX_SMALL_IMAGE_BYTES \
            or int(np.prod(chunks, dtype=object)) > MAX_SMALL_IMAGE_BYTES:
        raise DamagedArchiveError(f"{folder}: not a small uint8 zstd array as wsi-idf writes them: damaged or forged")
    return tuple(shape), tuple(chunks), kept


def read_small_array(folder: Path, zarr_format: int, meta: dict | None = None, path: str | None = None) -> np.ndarray:
    """A preview level or associated image, each chunk decompressed into a buffer of exactly its
    size: a zstd bomb raises instead of filling memory (plain zarr does not bound this). With the
    archive metadata ``meta``, each chunk must match the checksum recorded for array ``path``
    (``integrity``): damage, a moved chunk or one from another archive raises."""
    from numcodecs import Zstd
    from ..storage.source_tiles import decode_chunk
    from .integrity import check_chunk, chunk_boxes, expected_checksums
    shape, chunks, kept = check_small_array(folder, zarr_format)
    boxes = chunk_boxes(shape, chunks)
    expected = expected_checksums(meta, path, len(boxes)) if meta is not None else None
    archive_id = meta.get("archive_id") if meta is not None else None
    out = np.empty(shape, dtype=np.uint8)
    for k, (coords, box) in enumerate(boxes):
        chunk_path = FORMATS[zarr_format].small_chunk_file(folder, coords)
        buffer = np.empty(chunks, dtype=np.uint8)
        try:
            with open(chunk_path, "rb") as f:
                data = f.read(MAX_SMALL_IMAGE_BYTES + 1)
            if kept:  # a source image kept by the wsi_idf codec; its decoder checks sizes first
                buffer[...] = decode_chunk(data, chunks)
            else:
                Zstd().decode(data, out=buffer)
        except FileNotFoundError:
            raise ArchiveError(f"{chunk_path}: chunk missing: the archive is damaged") from None
        except (OSError, RuntimeError, ValueError, WsiIdfError) as exc:
            raise ArchiveError(f"{chunk_path}: chunk does not decompress to its {buffer.nbytes} bytes ({exc}): "
                               "the archive is damaged") from None
        pixels = buffer[tuple(slice(0, b.stop - b.start) for b in box)]
        check_chunk(archive_id, path or "", coords, pixels, expected[k] if expected else None, folder)
        out[box] = pixels
    return out


class CheckedLevel:
    """An array-like view of one level through ``LevelReader`` (for ``dask.array.from_array``)."""

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(self, reader):
        self.reader = reader
        self.shape = (CHANNELS, reader.height, reader.width)

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (3 - len(key))
        channels, ys, xs = (k if isinstance(k, slice) else slice(k, k + 1) for k in key)
        y0, y1, _ = ys.indices(self.shape[1])
        x0, x1, _ = xs.indices(self.shape[2])
        if y1 <= y0 or x1 <= x0:
            return np.empty((len(range(*channels.indices(CHANNELS))), max(0, y1 - y0), max(0, x1 - x0)), np.uint8)
        pixels, _ = self.reader.region(x0, y0, x1 - x0, y1 - y0)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1)[channels, ::ys.step or 1, ::xs.step or 1])
