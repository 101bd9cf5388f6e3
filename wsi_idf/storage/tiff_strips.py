"""TIFF strips made again from their pixels, byte for byte, so a restorable archive need not store them twice.

An Aperio label is an LZW image (horizontal predictor): the archive keeps its pixels (lossless JPEG
XL) for readers, and ``wsi-idf restore`` needs the file's own LZW bytes. libtiff's LZW encoder is
deterministic, so the strips are encoded again from the pixels with the same rules (a clear code
when the table reaches 4094 entries, code width growing one code early) instead of being stored.
Pack checks every strip against the file; a strip made by another encoder is stored as it is.
"""
from __future__ import annotations

import numpy as np

REGENERABLE = {"LZW": "lzw", "NONE": "none"}
CHECK_GAP = 10000  # libtiff's ratio check starts after this many input bytes; longer strips are not regenerated


def libtiff_lzw(data: bytes) -> bytes:
    """``data`` LZW-compressed exactly as libtiff's ``LZWEncode`` does for input below its ratio check."""
    out, acc, nacc = bytearray(), 0, 0
    nbits, maxcode, free_ent = 9, 511, 258
    table: dict[int, int] = {}

    def put(code: int) -> None:
        nonlocal acc, nacc
        acc, nacc = (acc << nbits) | code, nacc + nbits
        while nacc >= 8:
            nacc -= 8
            out.append((acc >> nacc) & 0xFF)
        acc &= (1 << nacc) - 1

    if not data:
        return b""
    put(256)
    ent = data[0]
    for c in data[1:]:
        key = (ent << 8) | c
        code = table.get(key)
        if code is not None:
            ent = code
            continue
        put(ent)
        ent = c
        table[key] = free_ent
        free_ent += 1
        if free_ent == 4094:  # table full: a clear code (at the full width), then start again
            table.clear()
            put(256)
            free_ent, nbits, maxcode = 258, 9, 511
        elif free_ent > maxcode:
            nbits += 1
            maxcode = (1 << nbits) - 1
    put(ent)
    free_ent += 1
    if free_ent == 4094:
        put(256)
        nbits = 9
    elif free_ent > maxcode:
        nbits += 1
    put(257)
    if nacc:
        out.append((acc << (8 - nacc)) & 0xFF)
    return bytes(out)


def encode_strips(pixels: np.ndarray, recipe: dict) -> list[bytes]:
    """The strips of an (h, w, 3) uint8 image as ``recipe`` (compression, predictor, rows per strip) says."""
    import imagecodecs
    rows, strips = recipe["rowsperstrip"], []
    for y in range(0, pixels.shape[0], rows):
        block = np.ascontiguousarray(pixels[y:y + rows])
        if recipe["predictor"] == 2:
            block = imagecodecs.delta_encode(block, axis=-2)
        data = block.tobytes()
        strips.append(libtiff_lzw(data) if recipe["compression"] == "lzw" else data)
    return strips


def strip_recipe(page) -> dict | None:
    """How a tifffile page's strips could be made again (None: they cannot)."""
    compression = REGENERABLE.get(page.compression.name)
    if compression is None or page.is_tiled or page.planarconfig != 1 or page.bitspersample != 8 \
            or page.samplesperpixel != 3 or page.predictor not in (1, 2) or page.fillorder != 1:
        return None
    rows = min(page.rowsperstrip, page.imagelength)
    if compression == "lzw" and rows * page.imagewidth * 3 >= CHECK_GAP:
        return None
    return {"compression": compression, "predictor": int(page.predictor), "rowsperstrip": int(rows)}
