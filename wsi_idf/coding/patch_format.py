"""The per-patch byte format (a promise: every version of wsi-idf decodes every older one).

    offset  size  field
    0       2     magic b"WI"
    2       1     format version (1, 2 or 3)
    3       1     mode: 0 raw, 1 IDF, 2 deflate, 3 source (version 3: a kept source tile), 4 JPEG XL
                  (wsi-idf 0.6: lossless JPEG XL of the (80, 80, 3) pixels, where it beats the IDF)
    4       4     first 4 bytes of the model file's sha256 (model id + weights hash)
    8       4     CRC32C of the raw pixels (C order, (3, 80, 80) uint8), little-endian; in version 3
                  extended over the position bytes, so a patch moved to another place fails its check
    12      5     version 3 only: the position, pyramid level (uint8, 255: none) and chunk row and
                  column (uint16 each): archives bind every patch to where it belongs
    12/17   ...   payload: raw bytes; rANS words (uint32 little-endian); or a zlib stream

Version 1 IDF payload: one rANS stack of, from the first popped: the top latents, then the
factored-out latents of each level from the coarsest to the finest.

Version 2 IDF payload (progressive): one rANS stream per flow level, coarsest first, so that a
prefix of the bytes decodes the coarse levels alone::

    0       1     S, the number of streams (the flow's levels)
    1       4(S-1)  word counts of streams 1..S-1 (uint32 little-endian); the last takes the rest
    ...           the streams' words: top latents, then each split level from the coarsest

Version 3 IDF payload: as version 2, with ``4(S-1)`` bytes after the word counts holding, for
each stream but the last, the CRC32C of its word count and words: a preview decodes only
checked streams (the last stream is checked through the pixel checksum).

Version 4 (wsi-idf 0.5, patches written into an archive): the bytes of version 3, with the CRC32C
extended over the archive's 16-byte id after the position, so a chunk copied from another archive
(or read through a handle opened before an overwrite) fails its check. The id is not stored in the
patch: the reader takes it from the archive (the codec configuration, the root metadata).
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum

import google_crc32c
import numpy as np

from ..config import CHANNELS, PATCH
from ..errors import CorruptPatchError

MAGIC = b"WI"
PATCH_FORMAT = 3  # written outside archives; every version in READABLE_VERSIONS is read
ARCHIVE_PATCH_FORMAT = 4  # written into an archive: the checksum covers the archive's id too
READABLE_VERSIONS = (1, 2, 3, 4)
ARCHIVE_ID_BYTES = 16
HEADER = struct.Struct("<2sBB4sI")
POSITION = struct.Struct("<BHH")
NO_LEVEL = 255  # a patch coded outside an archive (``encode_patches``, plain zarr writes)
MAX_GRID = 2**16 - 1  # chunk rows and columns a position can name
RAW_BYTES = CHANNELS * PATCH * PATCH


class Mode(IntEnum):
    RAW = 0
    IDF = 1
    DEFLATE = 2
    SOURCE = 3  # version 3: a slide's own compressed tile, kept (``wsi_idf.storage.source_tiles``)
    JXL = 4  # wsi-idf 0.6: lossless JPEG XL of the pixels (height, width, colour), where it is the smallest


Position = tuple[int, int, int]  # (pyramid level, chunk row, chunk column)


@dataclass(frozen=True)
class PatchHeader:
    mode: Mode
    weights_id: bytes
    crc32c: int
    version: int = PATCH_FORMAT
    position: Position | None = None  # version 3 patches written into an archive

    @property
    def size(self) -> int:
        """Header bytes before the payload."""
        return HEADER.size + (POSITION.size if self.version >= 3 else 0)


def position_bytes(position: Position | None) -> bytes:
    if position is None:
        return POSITION.pack(NO_LEVEL, 0, 0)
    level, row, col = position
    if not (0 <= level < NO_LEVEL and 0 <= row <= MAX_GRID and 0 <= col <= MAX_GRID):
        raise ValueError(f"patch position {position} is outside what the patch format can name "
                         f"(levels < {NO_LEVEL}, rows and columns <= {MAX_GRID})")
    return POSITION.pack(level, row, col)


def pixel_checksum(patch: np.ndarray, position: bytes = b"") -> int:
    """CRC32C of the pixels, extended over the position bytes (version 3)."""
    crc = google_crc32c.value(np.ascontiguousarray(patch, dtype=np.uint8).tobytes())
    return google_crc32c.extend(crc, position) if position else crc


def version_for(archive_id: bytes | None) -> int:
    """The patch format written: 4 inside an archive (its id given), else 3."""
    if archive_id is not None and len(archive_id) != ARCHIVE_ID_BYTES:
        raise ValueError(f"an archive id is {ARCHIVE_ID_BYTES} bytes, not {len(archive_id)}")
    return ARCHIVE_PATCH_FORMAT if archive_id is not None else PATCH_FORMAT


def pack(mode: Mode, weights_id: bytes, crc: int, payload: bytes, position: bytes, version: int = PATCH_FORMAT) -> bytes:
    """A version 3 (or, in an archive, 4) patch; ``crc`` is ``pixel_checksum(pixels, position [+ archive id])``."""
    return HEADER.pack(MAGIC, version, int(mode), weights_id, crc) + position + payload


def header_checksum(header: PatchHeader, pixels: np.ndarray, archive_id: bytes | None = None) -> int:
    """The checksum a header's pixels must have (its version's rule); version 4 needs its archive's id."""
    extra = position_bytes(header.position) if header.version >= 3 else b""
    if header.version >= 4:
        if archive_id is None:
            raise CorruptPatchError("it belongs to an archive, and this reader was not given the archive's id "
                                    "(read it through its archive, or the array's own codec configuration)")
        extra += archive_id
    return pixel_checksum(pixels, extra)


def unpack(blob: bytes) -> tuple[PatchHeader, memoryview]:
    blob = memoryview(bytes(blob)) if not isinstance(blob, (bytes, memoryview)) else memoryview(blob)
    if len(blob) < HEADER.size:
        raise CorruptPatchError(f"patch is truncated: {len(blob)} bytes, the header alone takes {HEADER.size}")
    magic, version, mode, weights_id, crc = HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise CorruptPatchError("not a wsi-idf patch (bad magic bytes): the chunk is damaged or not wsi_idf data")
    if version not in READABLE_VERSIONS:
        raise CorruptPatchError(f"patch format version {version} is not one this wsi-idf reads "
                                f"({', '.join(map(str, READABLE_VERSIONS))}): damaged, or newer (upgrade wsi-idf)")
    try:
        mode = Mode(mode)
    except ValueError:
        raise CorruptPatchError(f"unknown patch mode {mode}: the chunk is damaged") from None
    if version < 3:
        return PatchHeader(mode, bytes(weights_id), crc, version), blob[HEADER.size:]
    if len(blob) < HEADER.size + POSITION.size:
        raise CorruptPatchError("patch is truncated inside its position field")
    level, row, col = POSITION.unpack_from(blob, HEADER.size)
    position = None if level == NO_LEVEL else (level, row, col)
    return PatchHeader(mode, bytes(weights_id), crc, version, position), blob[HEADER.size + POSITION.size:]


def encode_plain(patch: np.ndarray, weights_id: bytes, crc: int, position: bytes, version: int = PATCH_FORMAT) -> bytes:
    """The fallback: deflate if it is smaller than raw, else raw."""
    raw = np.ascontiguousarray(patch).tobytes()
    packed = zlib.compress(raw, 9)
    if len(packed) < len(raw):
        return pack(Mode.DEFLATE, weights_id, crc, packed, position, version)
    return pack(Mode.RAW, weights_id, crc, raw, position, version)


def encode_jxl(patch: np.ndarray, weights_id: bytes, crc: int, position: bytes, version: int, effort: int) -> bytes:
    """Lossless JPEG XL of one (3, 80, 80) patch at ``effort`` (the per-patch ``smallest of`` mode)."""
    import imagecodecs
    stream = imagecodecs.jpegxl_encode(np.ascontiguousarray(patch.transpose(1, 2, 0)), lossless=True, effort=effort)
    return pack(Mode.JXL, weights_id, crc, stream, position, version)


def decode_jxl(payload: memoryview) -> np.ndarray:
    """A JPEG XL patch, its declared size checked before libjxl allocates anything."""
    import imagecodecs
    from .stream_headers import HeaderError, jxl_size
    data = bytes(payload)
    try:
        if jxl_size(data) != (PATCH, PATCH):
            raise CorruptPatchError(f"JPEG XL payload declares {jxl_size(data)} pixels, not a patch: it is damaged")
        pixels = imagecodecs.jpegxl_decode(data, out=np.empty((PATCH, PATCH, CHANNELS), np.uint8))
    except (HeaderError, ValueError, RuntimeError, imagecodecs.JpegxlError) as exc:
        raise CorruptPatchError(f"JPEG XL payload is damaged: {exc}") from None
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def decode_plain(header: PatchHeader, payload: memoryview) -> np.ndarray:
    if header.mode == Mode.JXL:
        return decode_jxl(payload)
    if header.mode == Mode.DEFLATE:
        try:
            inflater = zlib.decompressobj()
            raw = inflater.decompress(payload, RAW_BYTES + 1)  # bounded: never inflate past one patch
        except zlib.error as exc:
            raise CorruptPatchError(f"deflate payload is damaged: {exc}") from None
    else:
        raw = bytes(payload)
    if len(raw) != RAW_BYTES:
        raise CorruptPatchError(f"patch payload holds {len(raw)} bytes, expected {RAW_BYTES}: truncated or damaged")
    return np.frombuffer(raw, dtype=np.uint8).reshape(CHANNELS, PATCH, PATCH)


def _stream_crc(count: int, words: bytes | memoryview) -> int:
    return google_crc32c.extend(google_crc32c.value(struct.pack("<I", count)), bytes(words))


def _table_size(streams: int, version: int) -> int:
    return 1 + (8 if version >= 3 else 4) * (streams - 1)


def pack_streams(streams: list[np.ndarray]) -> bytes:
    """A version 3 IDF payload: the stream count, the word counts and CRC32Cs of all but the last, the words."""
    body = [np.asarray(words, dtype="<u4").tobytes() for words in streams]
    counts = [len(words) for words in streams[:-1]]
    crcs = [_stream_crc(n, data) for n, data in zip(counts, body)]
    return (bytes([len(streams)]) + np.asarray(counts, dtype="<u4").tobytes()
            + np.asarray(crcs, dtype="<u4").tobytes() + b"".join(body))


def streams_prefix(payload_head: bytes | memoryview, streams: int, version: int = PATCH_FORMAT) -> int | None:
    """Bytes of a version 2/3 IDF payload needed to decode its first ``streams`` streams (None: need more head)."""
    if len(payload_head) < 1:
        return None
    total = payload_head[0]
    table = _table_size(total, version)
    if total < 1 or len(payload_head) < table:
        return None if total >= 1 else -1
    counts = np.frombuffer(bytes(payload_head[1:1 + 4 * (total - 1)]), dtype="<u4").astype(np.int64)
    return table + 4 * int(counts[:max(0, streams)].sum()) if streams < total else -1  # -1: all of it


def unpack_streams(payload: memoryview, expected: int, needed: int, version: int = PATCH_FORMAT) -> list[np.ndarray]:
    """The first ``needed`` streams of a version 2/3 payload written for ``expected`` streams.

    Version 3 checks each returned stream's CRC32C except the last stream's (the pixel checksum
    covers it), so a damaged byte cannot reach a preview."""
    if len(payload) < 1 or payload[0] != expected:
        raise CorruptPatchError(f"progressive payload does not hold {expected} streams: the chunk is damaged")
    table = _table_size(expected, version)
    if len(payload) < table:
        raise CorruptPatchError("progressive payload is truncated inside its stream table")
    counts = np.frombuffer(bytes(payload[1:1 + 4 * (expected - 1)]), dtype="<u4").astype(np.int64)
    body = len(payload) - table
    if body % 4:
        raise CorruptPatchError("progressive payload is not a whole number of rANS words: it is damaged")
    words = np.frombuffer(bytes(payload[table:]), dtype="<u4")
    ends = np.cumsum(counts)
    if len(ends) and ends[-1] > len(words):
        if needed == expected or ends[needed - 1] > len(words):
            raise CorruptPatchError("progressive payload is shorter than its stream table says: it is damaged")
    bounds = [0, *ends.tolist(), len(words)]
    streams = [words[bounds[i]:bounds[i + 1]].astype(np.uint32) for i in range(needed)]
    if version >= 3:
        crcs = np.frombuffer(bytes(payload[1 + 4 * (expected - 1):table]), dtype="<u4")
        for i in range(min(needed, expected - 1)):
            if _stream_crc(int(counts[i]), streams[i].astype("<u4").tobytes()) != int(crcs[i]):
                raise CorruptPatchError(f"stream {i} of the patch fails its checksum (CRC32C): the chunk is damaged")
    return streams
