"""Keeping a slide's own compressed tiles (``--codec source``): smaller than re-coding their pixels.

Most slides were JPEG or JPEG 2000 compressed at scan time. Re-coding those decoded pixels
losslessly costs several times the file; keeping the tiles costs less than the file:

- JPEG tiles (JPEGTables merged in) are recompressed losslessly with JPEG XL's JPEG
  reconstruction (``jpegxl_encode_jpeg``; about 0.72x on the CMU slide). Reading rebuilds the
  exact JPEG bytes and decodes them with the call tifffile makes (libjpeg-turbo through
  imagecodecs, the same colour-space choice), so the pixels are tifffile's, never libjxl's.
  A tile JPEG XL cannot rebuild exactly is kept as JPEG.
- JPEG 2000 tiles are kept as they are and decoded as tifffile does (OpenJPEG via imagecodecs).
- JPEG with restart markers (NDPI): tifffile reads each restart interval (one MCU row of a
  band, e.g. 8x3968) as a tile. A chunk stacks the intervals of one square (e.g. 3968x3968: 496
  intervals) into one JPEG stream, its markers renumbered, recompressed with JPEG XL like a
  tile; reading splits it at the markers and decodes each interval with the call tifffile makes.
- Associated images that are not JPEG (e.g. an LZW label) are stored as lossless JPEG XL.

Each kept segment's own bytes come back from its chunk (``Piece``: a slice of the chunk's stream
between a small prefix and suffix), which is what ``wsi-idf restore`` rebuilds the source file from.

Each chunk is a patch-format blob (mode ``SOURCE``): the usual header with the CRC32C of its
decoded pixels and its position, then a 4-byte source header (kind, JPEG colour spaces, pixel
layout) and the data. So a damaged source chunk raises like a damaged IDF patch.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from ..coding import patch_format as fmt
from ..errors import CorruptPatchError
from ..coding.stream_headers import HeaderError, check_fits, j2k_size, jpeg_size, jxl_size

SOURCE_HEADER = struct.Struct("<BBBB")  # kind, colorspace, outcolorspace (255: None), layout
NO_ID = b"\0\0\0\0"  # source chunks use no model
# the lossy compressions (of ``slide.LOSSY_COMPRESSIONS``) whose tiles are kept as they are
KEPT_KINDS = {"JPEG": "jpeg", "APERIO_JP2000_RGB": "jpeg2000", "JPEG2000": "jpeg2000"}
MAX_TILE = 4096


def max_chunk_bytes(height: int, width: int) -> int:
    """The most a kept tile's chunk may take: twice its raw pixels (a JPEG or JPEG 2000 tile is
    smaller than raw in practice). Readers treat a larger chunk as damage, so pack refuses to write one."""
    return 2 * 3 * height * width + 4096


class Kind(IntEnum):
    JPEG_AS_JPEGXL = 1  # a JPEG stream, losslessly recompressed
    JPEG = 2  # a JPEG stream kept as it is
    JPEG2000 = 3  # a JPEG 2000 codestream kept as it is
    PIXELS_JPEGXL = 4  # pixels in lossless JPEG XL (associated images without a lossy source)
    INTERVALS_AS_JPEGXL = 5  # restart intervals stacked into one JPEG stream, losslessly recompressed
    INTERVALS = 6  # the same stream kept as it is


class Layout(IntEnum):
    PLANAR = 0  # (3, h, w): pyramid levels
    INTERLEAVED = 1  # (h, w, 3): associated images


@dataclass(frozen=True)
class TileCoding:
    """How one TIFF page's tiles (or strips) were compressed: what decoding them needs."""
    kind: str  # "jpeg" or "jpeg2000"
    tables: bytes | None  # JPEGTables
    colorspace: int | None  # tifffile's jpeg_decode arguments
    outcolorspace: int | None
    header: bytes | None = None  # a restart interval's JPEG header (tifffile's NDPI ``jpegheader``)


@dataclass(frozen=True)
class Piece:
    """How one source segment's bytes come back from its chunk's stream: ``prefix + stream[start:stop]
    + suffix`` (e.g. SOI + the tile after its merged JPEGTables; an interval and its restart marker)."""
    start: int
    stop: int
    prefix: bytes = b""
    suffix: bytes = b""

    def rebuild(self, stream: bytes) -> bytes:
        return self.prefix + stream[self.start:self.stop] + self.suffix


def page_coding(page) -> TileCoding | None:
    """The lossy coding of a tifffile page whose segments can be kept, or None (then code its pixels)."""
    kind = KEPT_KINDS.get(page.compression.name)
    if kind is None or page.planarconfig != 1 or page.samplesperpixel != 3 or page.bitspersample != 8 \
            or page.extrasamples:
        return None
    colorspace = outcolorspace = None
    if kind == "jpeg":
        from tifffile.tifffile import jpeg_decode_colorspace
        colorspace, outcolorspace = jpeg_decode_colorspace(page.photometric, page.planarconfig,
                                                           page.extrasamples, page.is_jfif)
        if not all(v is None or isinstance(v, int) and 0 <= v < 255 for v in (colorspace, outcolorspace)):
            return None
    header = getattr(page, "jpegheader", None)
    return TileCoding(kind, page.jpegtables, colorspace, outcolorspace, bytes(header) if header else None)


def merge_tables(segment: bytes, tables: bytes | None) -> bytes:
    """One JPEG stream from a TIFF segment and the page's JPEGTables (SOI + tables + the rest)."""
    if not tables:
        return segment
    if tables[:2] != b"\xff\xd8" or tables[-2:] != b"\xff\xd9" or segment[:2] != b"\xff\xd8":
        raise ValueError("JPEG segment or tables without SOI/EOI markers")
    return segment[:2] + tables[2:-2] + segment[2:]


SOI, EOI = b"\xff\xd8", b"\xff\xd9"


def restart_marker(index: int) -> bytes:
    """RSTn, n = index mod 8: the marker that ends restart interval ``index`` of a scan."""
    return bytes((0xFF, 0xD0 + index % 8))


def stack_intervals(segments: list[bytes], header: bytes, tile_height: int, indices: list[int], total: int
                    ) -> tuple[bytes, list[Piece]]:
    """One JPEG stream of restart intervals ``indices`` of ``total`` in the scan (each ``tile_height``
    rows), one above the other, and the pieces that give each interval's own bytes back.

    Each stored interval ends with its restart marker (RSTn of its index in the scan, EOI for the
    last); in the stream the markers are renumbered from 0 and the last becomes EOI."""
    sof = _sof_offset(header)
    stream = [header[:sof], (tile_height * len(segments)).to_bytes(2, "big"), header[sof + 2:]]
    at = len(header)
    pieces = []
    for k, (segment, index) in enumerate(zip(segments, indices, strict=True)):
        own = EOI if index == total - 1 else restart_marker(index)
        if segment[-2:] != own:
            raise ValueError(f"restart interval {index} does not end with its marker {own.hex()}")
        body = segment[:-2]
        stream += [body, EOI if k == len(segments) - 1 else restart_marker(k)]
        pieces.append(Piece(at, at + len(body), b"", own))
        at += len(body) + 2
    return b"".join(stream), pieces


def _sof_offset(header: bytes) -> int:
    """Offset of the SOF's height field in a JPEG header (tifffile's ``ndpi_jpeg_tile`` patches the same)."""
    i = 2
    while i + 4 <= len(header):
        if header[i] != 0xFF:
            break
        marker, length = header[i + 1], int.from_bytes(header[i + 2:i + 4], "big")
        if marker == 0xC0:
            return i + 5
        i += 2 + length
    raise ValueError("no baseline SOF in the JPEG header")


def split_intervals(stream: bytes) -> tuple[bytes, list[bytes]]:
    """The header (through SOS) and the restart intervals (each with its marker) of a stacked stream."""
    i = 2
    while True:
        if i + 4 > len(stream) or stream[i] != 0xFF:
            raise ValueError("JPEG header without a start of scan")
        marker, length = stream[i + 1], int.from_bytes(stream[i + 2:i + 4], "big")
        i += 2 + length
        if marker == 0xDA:
            break
    header, intervals, start = stream[:i], [], i
    data = np.frombuffer(stream, dtype=np.uint8)
    marks = np.flatnonzero((data[i:-1] == 0xFF) & (((data[i + 1:] >= 0xD0) & (data[i + 1:] <= 0xD7))
                                                    | (data[i + 1:] == 0xD9))) + i
    for m in marks:
        intervals.append(stream[start:m + 2])
        start = m + 2
        if stream[m + 1] == 0xD9:
            break
    return header, intervals


def decode_intervals(stream: bytes, coding: TileCoding, bound: tuple[int, int] | None = None) -> np.ndarray:
    """(h, w, 3) pixels of a stacked stream: each interval decoded alone, as tifffile decodes an NDPI
    tile; nothing is allocated beyond ``bound`` (h, w)."""
    import imagecodecs
    from tifffile.tifffile import ndpi_jpeg_tile
    header, intervals = split_intervals(stream)
    tile_height, tile_width, tile_header = ndpi_jpeg_tile(header)
    if bound is not None and not (0 < tile_width <= bound[1] and 0 < tile_height * len(intervals) <= bound[0]):
        raise ValueError(f"{len(intervals)} intervals of {tile_height}x{tile_width} do not fit {bound}")
    out = np.empty((tile_height * len(intervals), tile_width, 3), dtype=np.uint8)
    for k, interval in enumerate(intervals):
        pixels = imagecodecs.jpeg_decode(interval, bitspersample=8, header=tile_header,
                                         colorspace=coding.colorspace, outcolorspace=coding.outcolorspace,
                                         shape=(tile_height, tile_width))
        out[k * tile_height:(k + 1) * tile_height] = np.asarray(pixels).reshape(tile_height, tile_width, -1)
    return out


def decode_segment(data: bytes, coding: TileCoding, shape: tuple[int, int]) -> np.ndarray:
    """(h, w, 3) pixels of one source segment, decoded exactly as tifffile does."""
    import imagecodecs
    if coding.kind == "jpeg":
        pixels = imagecodecs.jpeg_decode(data, bitspersample=8, tables=coding.tables, colorspace=coding.colorspace,
                                         outcolorspace=coding.outcolorspace, shape=shape)
    else:
        pixels = imagecodecs.jpeg2k_decode(data)
    return np.ascontiguousarray(pixels).reshape(pixels.shape[0], pixels.shape[1], -1)


def _header(kind: Kind, coding: TileCoding | None, layout: Layout) -> bytes:
    cs = 255 if coding is None or coding.colorspace is None else coding.colorspace
    ocs = 255 if coding is None or coding.outcolorspace is None else coding.outcolorspace
    return SOURCE_HEADER.pack(int(kind), cs, ocs, int(layout))


def _planar(pixels: np.ndarray, layout: Layout) -> np.ndarray:
    return np.ascontiguousarray(pixels.transpose(2, 0, 1) if layout == Layout.PLANAR else pixels)


def _padded(pixels: np.ndarray, chunk: tuple[int, int]) -> np.ndarray:
    """Pixels in a chunk of ``chunk`` (h, w), zeros beyond: a TIFF's last strip is shorter than the rest."""
    if pixels.shape[:2] == tuple(chunk):
        return pixels
    out = np.zeros((*chunk, 3), dtype=np.uint8)
    out[:pixels.shape[0], :pixels.shape[1]] = pixels
    return out


def encode_segment(segment: bytes, coding: TileCoding, shape: tuple[int, int], layout: Layout,
                   position: fmt.Position | None = None, chunk: tuple[int, int] | None = None,
                   archive_id: bytes | None = None) -> tuple[bytes, np.ndarray, list[Piece]]:
    """A chunk keeping one source segment of ``shape`` (h, w) in a chunk of ``chunk`` (default: the
    same), its (h, w, 3) pixels (for checksums and verification), and the piece that gives the
    segment's own bytes back."""
    pixels = decode_segment(segment, coding, shape)
    if pixels.shape[:2] != tuple(shape):
        raise ValueError(f"a source segment decodes to {pixels.shape[:2]}, not {tuple(shape)}")
    if coding.kind != "jpeg":
        blob = _pack(Kind.JPEG2000, None, segment, pixels, layout, position, chunk or shape, archive_id)
        return blob, pixels, [Piece(0, len(segment))]
    stream = merge_tables(segment, coding.tables)
    piece = Piece(0, len(stream)) if stream is segment else Piece(len(coding.tables) - 2, len(stream), SOI)
    blob = _pack_jpeg(stream, (Kind.JPEG, Kind.JPEG_AS_JPEGXL), coding, pixels, layout, position, chunk or shape,
                      archive_id)
    return blob, pixels, [piece]


def encode_intervals(segments: list[bytes], coding: TileCoding, indices: list[int], total: int, layout: Layout,
                     position: fmt.Position | None, chunk: tuple[int, int], archive_id: bytes | None = None
                     ) -> tuple[bytes, np.ndarray, list[Piece]]:
    """A chunk keeping restart intervals ``indices`` (of ``total`` in the scan) stacked into one stream,
    its pixels and the pieces that give each interval's own bytes back (``stack_intervals``)."""
    from tifffile.tifffile import ndpi_jpeg_tile
    tile_height, _, _ = ndpi_jpeg_tile(coding.header)
    stream, pieces = stack_intervals(segments, coding.header, tile_height, indices, total)
    pixels = decode_intervals(stream, coding)
    blob = _pack_jpeg(stream, (Kind.INTERVALS, Kind.INTERVALS_AS_JPEGXL), coding, pixels, layout, position, chunk,
                      archive_id)
    return blob, pixels, pieces


def _pack_jpeg(stream: bytes, kinds: tuple[Kind, Kind], coding: TileCoding, pixels: np.ndarray, layout: Layout,
               position: fmt.Position | None, chunk: tuple[int, int], archive_id: bytes | None = None) -> bytes:
    """A JPEG stream's chunk: recompressed with JPEG XL when libjxl rebuilds it exactly and smaller."""
    import imagecodecs
    kind, data = kinds[0], stream
    try:
        packed = imagecodecs.jpegxl_encode_jpeg(stream)
        if imagecodecs.jpegxl_decode_jpeg(packed) == stream and len(packed) < len(stream):
            kind, data = kinds[1], packed
    except Exception:  # noqa: BLE001 - libjxl declines some JPEGs: keep those as they are
        pass
    return _pack(kind, coding, data, pixels, layout, position, chunk, archive_id)


def _pack(kind: Kind, coding: TileCoding | None, data: bytes, pixels: np.ndarray, layout: Layout,
          position: fmt.Position | None, chunk: tuple[int, int], archive_id: bytes | None = None) -> bytes:
    place = fmt.position_bytes(position)
    crc = fmt.pixel_checksum(_planar(_padded(pixels, chunk), layout), place + (archive_id or b""))
    return fmt.pack(fmt.Mode.SOURCE, NO_ID, crc, _header(kind, coding, layout) + bytes(data), place,
                    fmt.version_for(archive_id))


def chunk_codec(blob: bytes) -> str | None:
    """The source codec a kept chunk holds ("jpeg" or "jpeg2000"; None: pixels, or not a source chunk)."""
    try:
        header, payload = fmt.unpack(blob)
    except CorruptPatchError:
        return None
    if header.mode != fmt.Mode.SOURCE or len(payload) < SOURCE_HEADER.size:
        return None
    return {Kind.JPEG2000: "jpeg2000", Kind.PIXELS_JPEGXL: None}.get(payload[0], "jpeg")


def encode_pixels(pixels: np.ndarray, layout: Layout, position: fmt.Position | None = None) -> bytes:
    """A chunk of (h, w, 3) pixels in lossless JPEG XL (an associated image without a lossy source)."""
    import imagecodecs
    place = fmt.position_bytes(position)
    crc = fmt.pixel_checksum(_planar(pixels, layout), place)
    data = imagecodecs.jpegxl_encode(np.ascontiguousarray(pixels), lossless=True, effort=9)
    return fmt.pack(fmt.Mode.SOURCE, NO_ID, crc, _header(Kind.PIXELS_JPEGXL, None, layout) + bytes(data), place)


def decode_chunk(blob: bytes, shape: tuple[int, ...], position: fmt.Position | None = None,
                 check_position: bool = False, archive_id: bytes | None = None,
                 streams: list | None = None) -> np.ndarray:
    """The pixels of a ``SOURCE`` chunk in the array's chunk ``shape`` ((3, h, w) or (h, w, 3)).

    Sizes are read from the stream headers and must fit the chunk before anything is decoded;
    the result must match the chunk's CRC32C. Edge chunks of the source are full tiles, as in TIFF.
    ``streams``, when given, receives the stream decoded (a JPEG rebuilt from its JPEG XL, which ``Piece``s index), so a
    restore does not rebuild it a second time.
    """
    import imagecodecs
    header, payload = fmt.unpack(blob)
    if header.mode != fmt.Mode.SOURCE or len(payload) < SOURCE_HEADER.size:
        raise CorruptPatchError("not a source chunk, or truncated: it is damaged")
    if check_position and header.position != position:
        raise CorruptPatchError(f"it was written for {header.position}, not {position} (level, row, column): "
                                "a moved or aliased chunk")
    kind, cs, ocs, layout = SOURCE_HEADER.unpack_from(payload)
    data = bytes(payload[SOURCE_HEADER.size:])
    try:
        kind, layout = Kind(kind), Layout(layout)
    except ValueError:
        raise CorruptPatchError("unknown source chunk kind or layout: it is damaged") from None
    h, w = (shape[1], shape[2]) if layout == Layout.PLANAR else (shape[0], shape[1])
    expected = (3, h, w) if layout == Layout.PLANAR else (h, w, 3)
    if tuple(shape) != expected:
        raise CorruptPatchError(f"source chunk of layout {layout.name} does not fit the chunk shape {tuple(shape)}")
    try:
        if kind in (Kind.PIXELS_JPEGXL, Kind.JPEG_AS_JPEGXL, Kind.INTERVALS_AS_JPEGXL):
            check_fits(jxl_size(data), (h, w), "JPEG XL stream")  # before libjxl allocates anything
        if kind == Kind.PIXELS_JPEGXL:
            pixels = imagecodecs.jpegxl_decode(data, out=np.empty((h, w, 3), np.uint8))
        else:
            if kind in (Kind.JPEG_AS_JPEGXL, Kind.INTERVALS_AS_JPEGXL):
                data = imagecodecs.jpegxl_decode_jpeg(data)
            size = j2k_size(data) if kind == Kind.JPEG2000 else jpeg_size(data)
            check_fits(size, (h, w), "JPEG 2000 codestream" if kind == Kind.JPEG2000 else "JPEG stream")
            coding = TileCoding("jpeg2000" if kind == Kind.JPEG2000 else "jpeg", None,
                                None if cs == 255 else cs, None if ocs == 255 else ocs)
            if kind in (Kind.INTERVALS, Kind.INTERVALS_AS_JPEGXL):
                pixels = decode_intervals(data, coding, (h, w))
                if pixels.shape[0] != size[0]:
                    raise CorruptPatchError(f"the stream's intervals do not fill its size {size}")
                pixels = _padded(pixels, (h, w))
            else:
                pixels = _padded(decode_segment(data, coding, size), (h, w))
    except (CorruptPatchError, HeaderError) as exc:
        raise CorruptPatchError(f"source chunk is damaged or hostile: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the decoders raise several types for damaged data
        raise CorruptPatchError(f"source chunk does not decode ({type(exc).__name__}: {exc}): it is damaged") from None
    if pixels.shape != (h, w, 3) or pixels.dtype != np.uint8:
        raise CorruptPatchError(f"source chunk decodes to {pixels.shape} {pixels.dtype}, not ({h}, {w}, 3) uint8")
    out = _planar(pixels, layout)
    if fmt.header_checksum(header, out, archive_id) != header.crc32c:
        raise CorruptPatchError("source chunk's pixel checksum (CRC32C) does not match: it is damaged "
                                "(or belongs to another archive)")
    if streams is not None:
        streams.append(data)
    return out
