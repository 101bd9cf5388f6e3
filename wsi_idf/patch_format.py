"""The per-patch byte format (a promise: every version of wsi-idf decodes every older one).

    offset  size  field
    0       2     magic b"WI"
    2       1     format version (1)
    3       1     mode: 0 raw, 1 IDF, 2 deflate
    4       4     first 4 bytes of the model file's sha256 (model id + weights hash)
    8       4     CRC32C of the raw pixels (C order, (3, 80, 80) uint8), little-endian
    12      ...   payload: raw bytes; rANS words (uint32 little-endian); or a zlib stream

The IDF payload is the rANS stack of, from the first popped: the top latents, then the
factored-out latents of each level from the coarsest to the finest.
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
FORMAT_VERSION = 1
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
    if version != FORMAT_VERSION:
        raise CorruptPatchError(f"patch format version {version} is newer than this wsi-idf reads "
                                f"({FORMAT_VERSION}): upgrade wsi-idf")
    try:
        mode = Mode(mode)
    except ValueError:
        raise CorruptPatchError(f"unknown patch mode {mode}: the chunk is damaged") from None
    return PatchHeader(mode, bytes(weights_id), crc), blob[HEADER.size:]


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
