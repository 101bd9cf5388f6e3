"""The per-patch byte format (a promise: every version of wsi-idf decodes every older one).

    offset  size  field
    0       2     magic b"WI"
    2       1     format version (1 or 2)
    3       1     mode: 0 raw, 1 IDF, 2 deflate
    4       4     first 4 bytes of the model file's sha256 (model id + weights hash)
    8       4     CRC32C of the raw pixels (C order, (3, 80, 80) uint8), little-endian
    12      ...   payload: raw bytes; rANS words (uint32 little-endian); or a zlib stream

Version 1 IDF payload: one rANS stack of, from the first popped: the top latents, then the
factored-out latents of each level from the coarsest to the finest.

Version 2 IDF payload (progressive): one rANS stream per flow level, coarsest first, so that a
prefix of the bytes decodes the coarse levels alone::

    0       1     S, the number of streams (the flow's levels)
    1       4(S-1)  word counts of streams 1..S-1 (uint32 little-endian); the last takes the rest
    ...           the streams' words: top latents, then each split level from the coarsest
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum

import google_crc32c
import numpy as np

from .config import CHANNELS, PATCH
from .errors import CorruptPatchError

MAGIC = b"WI"
FORMAT_VERSION = 2  # written; every version in READABLE_VERSIONS is read
READABLE_VERSIONS = (1, 2)
HEADER = struct.Struct("<2sBB4sI")
RAW_BYTES = CHANNELS * PATCH * PATCH


class Mode(IntEnum):
    RAW = 0
    IDF = 1
    DEFLATE = 2


@dataclass(frozen=True)
class PatchHeader:
    mode: Mode
    weights_id: bytes
    crc32c: int
    version: int = FORMAT_VERSION


def pixel_checksum(patch: np.ndarray) -> int:
    return google_crc32c.value(np.ascontiguousarray(patch, dtype=np.uint8).tobytes())


def pack(mode: Mode, weights_id: bytes, crc: int, payload: bytes) -> bytes:
    return HEADER.pack(MAGIC, FORMAT_VERSION, int(mode), weights_id, crc) + payload


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
    return PatchHeader(mode, bytes(weights_id), crc, version), blob[HEADER.size:]


def encode_plain(patch: np.ndarray, weights_id: bytes, crc: int) -> bytes:
    """The fallback: deflate if it is smaller than raw, else raw."""
    raw = np.ascontiguousarray(patch).tobytes()
    packed = zlib.compress(raw, 9)
    if len(packed) < len(raw):
        return pack(Mode.DEFLATE, weights_id, crc, packed)
    return pack(Mode.RAW, weights_id, crc, raw)


def decode_plain(header: PatchHeader, payload: memoryview) -> np.ndarray:
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


def pack_streams(streams: list[np.ndarray]) -> bytes:
    """A version 2 IDF payload: the stream count, the word counts of all but the last, the words."""
    counts = [len(words) for words in streams[:-1]]
    return (bytes([len(streams)]) + np.asarray(counts, dtype="<u4").tobytes()
            + b"".join(np.asarray(words, dtype="<u4").tobytes() for words in streams))


def streams_prefix(payload_head: bytes | memoryview, streams: int) -> int | None:
    """Bytes of a version 2 IDF payload needed to decode its first ``streams`` streams (None: need more head)."""
    if len(payload_head) < 1:
        return None
    total = payload_head[0]
    table = 1 + 4 * (total - 1)
    if len(payload_head) < table:
        return None
    counts = np.frombuffer(bytes(payload_head[1:table]), dtype="<u4").astype(np.int64)
    return table + 4 * int(counts[:max(0, streams)].sum()) if streams < total else -1  # -1: all of it


def unpack_streams(payload: memoryview, expected: int, needed: int) -> list[np.ndarray]:
    """The first ``needed`` streams of a version 2 payload written for ``expected`` streams."""
    if len(payload) < 1 or payload[0] != expected:
        raise CorruptPatchError(f"progressive payload does not hold {expected} streams: the chunk is damaged")
    table = 1 + 4 * (expected - 1)
    if len(payload) < table:
        raise CorruptPatchError("progressive payload is truncated inside its stream table")
    counts = np.frombuffer(bytes(payload[1:table]), dtype="<u4").astype(np.int64)
    body = len(payload) - table
    if body % 4:
        raise CorruptPatchError("progressive payload is not a whole number of rANS words: it is damaged")
    words = np.frombuffer(bytes(payload[table:]), dtype="<u4")
    ends = np.cumsum(counts)
    if len(ends) and ends[-1] > len(words):
        if needed == expected or ends[needed - 1] > len(words):
            raise CorruptPatchError("progressive payload is shorter than its stream table says: it is damaged")
    bounds = [0, *ends.tolist(), len(words)]
    return [words[bounds[i]:bounds[i + 1]].astype(np.uint32) for i in range(needed)]
