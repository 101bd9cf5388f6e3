"""Image sizes read from compressed streams' headers, strictly, before any decoder sees the bytes.

A kept tile is decoded by libjpeg-turbo, OpenJPEG or libjxl, which allocate what a header says.
Archives are not trusted, so a chunk's stream must declare a size that fits its chunk and at most
4 components before it is decoded: a 4 KB JPEG XL that would rebuild a 12288x12288 JPEG, a JPEG
whose SOF hides behind fill bytes, or a JPEG 2000 codestream with 1800 components is refused in
a few microseconds instead of exhausting memory.
"""
from __future__ import annotations

import struct

MAX_COMPONENTS = 4
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # DHT, JPG and DAC are not frames
JXL_RATIOS = {1: (1, 1), 2: (12, 10), 3: (4, 3), 4: (3, 2), 5: (16, 9), 6: (5, 4), 7: (2, 1)}
JXL_CONTAINER = b"\x00\x00\x00\x0cJXL \r\n\x87\n"


class HeaderError(ValueError):
    """A stream header that is malformed or declares what its chunk cannot hold."""


def jpeg_size(stream: bytes) -> tuple[int, int, int]:
    """(height, width, components) of a JPEG's frame. Fill bytes (0xFF runs) before a marker are
    skipped as libjpeg skips them; anything but markers before the first SOF is refused."""
    if stream[:2] != b"\xff\xd8":
        raise HeaderError("not a JPEG stream (no SOI)")
    i = 2
    while i < len(stream):
        if stream[i] != 0xFF:
            raise HeaderError(f"a JPEG with data outside its markers at byte {i}")
        while i < len(stream) and stream[i] == 0xFF:  # fill bytes
            i += 1
        if i + 2 >= len(stream):
            break
        marker = stream[i]
        if marker in (0x01,) or 0xD0 <= marker <= 0xD7:
            i += 1
            continue
        if marker in (0xD9, 0xDA):
            raise HeaderError("a JPEG without a frame header before its scan")
        length = int.from_bytes(stream[i + 1:i + 3], "big")
        if length < 2:
            raise HeaderError("a JPEG marker with an impossible length")
        if marker in SOF_MARKERS:
            if length < 8 or i + 9 > len(stream):
                raise HeaderError("a truncated JPEG frame header")
            height, width = struct.unpack(">HH", stream[i + 4:i + 8])
            return height, width, stream[i + 8]
        i += 1 + length
    raise HeaderError("a JPEG without a frame header")


def j2k_size(stream: bytes) -> tuple[int, int, int]:
    """(height, width, components) from a JPEG 2000 codestream's SIZ marker."""
    if stream[:4] != b"\xff\x4f\xff\x51" or len(stream) < 42:
        raise HeaderError("not a JPEG 2000 codestream (no SOC and SIZ)")
    xsiz, ysiz, xo, yo = struct.unpack(">IIII", stream[8:24])  # then tile size and offset, then Csiz
    components = struct.unpack(">H", stream[40:42])[0]
    if xsiz <= xo or ysiz <= yo:
        raise HeaderError("a JPEG 2000 codestream with an empty image")
    return ysiz - yo, xsiz - xo, components


def jxl_codestream(data: bytes, need: int = 16) -> bytes:
    """The first ``need`` bytes of a JPEG XL codestream: the data itself, or from its container's
    jxlc box or jxlp boxes (a codestream split into parts, e.g. around a JPEG reconstruction box)."""
    if data[:2] == b"\xff\x0a":
        return data[:need]
    if data[:12] != JXL_CONTAINER:
        raise HeaderError("not a JPEG XL stream")
    i, parts = 0, b""
    while i + 8 <= len(data) and len(parts) < need:
        size, kind = int.from_bytes(data[i:i + 4], "big"), data[i + 4:i + 8]
        head = 8
        if size == 1:
            if i + 16 > len(data):
                break
            size, head = int.from_bytes(data[i + 8:i + 16], "big"), 16
        elif size == 0:
            size = len(data) - i
        if size < head:
            raise HeaderError("a JPEG XL box with an impossible size")
        if kind == b"jxlc":
            return data[i + head:i + size][:need]
        if kind == b"jxlp":
            parts += data[i + head + 4:i + size]  # after the part's index
        i += size
    if not parts:
        raise HeaderError("a JPEG XL container without a codestream")
    return parts[:need]


def jxl_size(data: bytes) -> tuple[int, int]:
    """(height, width) from a JPEG XL SizeHeader (ISO/IEC 18181-1), bare or in its container."""
    code = jxl_codestream(data)
    if code[:2] != b"\xff\x0a" or len(code) < 14:
        raise HeaderError("a JPEG XL codestream without its signature and size")
    bits, pos = int.from_bytes(code[2:14], "little"), 0

    def u(n: int) -> int:
        nonlocal pos
        value = (bits >> pos) & ((1 << n) - 1)
        pos += n
        return value

    def u32() -> int:
        return 1 + u((9, 13, 18, 30)[u(2)])

    small = u(1)
    height = 8 * (1 + u(5)) if small else u32()
    ratio = u(3)
    if ratio:
        num, den = JXL_RATIOS[ratio]
        width = height * num // den
    else:
        width = 8 * (1 + u(5)) if small else u32()
    return height, width


def check_fits(size: tuple[int, ...], bound: tuple[int, int], what: str) -> None:
    """A declared (height, width[, components]) must fit (height, width) and hold 1 to 4 components."""
    if not (0 < size[0] <= bound[0] and 0 < size[1] <= bound[1]):
        raise HeaderError(f"the {what} declares {size[0]}x{size[1]} pixels, more than its chunk's {bound[0]}x{bound[1]}")
    if len(size) > 2 and not 0 < size[2] <= MAX_COMPONENTS:
        raise HeaderError(f"the {what} declares {size[2]} components")
