"""Reading slides: tifffile and OpenSlide backends behind one small interface.

A slide is a list of pyramid levels, each read a region at a time as (h, w, 3) uint8 RGB,
plus its metadata and associated images. Neither tifffile's zarr stores nor OpenSlide
handles pickle, so Dask tasks carry a :class:`SlideRef` and call :func:`cached_slide`,
which opens each slide once per process.
"""
from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import SlideError
from .slide_base import Level, Slide, SlideInfo, SlideRef, SourceSegments, check_rgb8

__all__ = ["Level", "Slide", "SlideInfo", "SlideRef", "SourceSegments", "check_rgb8", "open_slide", "cached_slide",
           "level_as_dask", "halve", "composite", "LOSSY_COMPRESSIONS", "ASSOCIATED_NAMES", "BACKENDS"]

BACKENDS = ("auto", "tifffile", "openslide")
ASSOCIATED_NAMES = ("label", "macro", "thumbnail")
# TIFF compressions that were lossy at scan time: the decoded pixels are the best that exist
LOSSY_COMPRESSIONS = frozenset({"JPEG", "OJPEG", "APERIO_JP2000_RGB", "APERIO_JP2000_YCBC", "JPEG2000", "WEBP", "JPEGXR"})
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class TiffSlide(Slide):
    """SVS, pyramidal TIFF, OME-TIFF, NDPI, SCN ... through tifffile: decodes only the tiles a read touches."""

    backend = "tifffile"

    def __init__(self, path: Path):
        import tifffile
        super().__init__(path)
        try:
            with tifffile_errors() as errors:
                self._tif = tifffile.TiffFile(path)
                for _ in self._tif.pages:  # walk the whole IFD chain: a cut-off file breaks it
                    pass
                series = main_series(self._tif)
            if errors:
                self._tif.close()
                raise SlideError(f"{path.name}: damaged or truncated TIFF ({errors[0]})")
        except SlideError:
            raise
        except Exception as exc:
            raise SlideError(f"{path.name}: cannot be read as a TIFF slide; the file may be truncated or damaged "
                             f"({type(exc).__name__}: {exc})") from exc
        self._series = series
        check_rgb8(path.name, series.dtype, series.shape, series.axes)
        if self._tif.is_bif:
            check_bif_overlap(path.name, self._tif)
        base = series.levels[0].shape
        for lv in series.levels:
            check_rgb8(path.name, lv.dtype, lv.shape, lv.axes)
            h, w = lv.shape[0], lv.shape[1]
            self.levels.append(Level(w, h, (base[1] / w + base[0] / h) / 2))
        self._check_complete()
        self._arrays: dict[int, object] = {}
        self.info = self._read_info()

    def _check_complete(self) -> None:
        """Refuse truncated files up front: every tile of every level must lie inside the file."""
        size = self.path.stat().st_size
        for lv in self._series.levels:
            for page in lv.pages:
                if page is None:
                    continue
                ends = np.asarray(page.dataoffsets, dtype=np.int64) + np.asarray(page.databytecounts, np.int64)
                if len(ends) and int(ends.max()) > size:
                    raise SlideError(f"{self.path.name}: truncated file: image data runs past its end "
                                     f"({int(ends.max())} > {size} bytes)")

    def _array(self, level: int):
        if level not in self._arrays:
            import zarr
            self._arrays[level] = zarr.open(self._series.aszarr(level=level), mode="r")
        return self._arrays[level]

    def _read(self, level, y0, y1, x0, x1):
        return self._array(level)[y0:y1, x0:x1]

    def _read_info(self) -> SlideInfo:
        import imagecodecs
        import tifffile
        page = self._tif.pages.first
        props = openslide_properties(self.path)
        description = page.description or ""
        if description and "tiff.ImageDescription" not in props:
            props["tiff.ImageDescription"] = description
        icc = page.tags.get(34675)
        mpp = mpp_from(props)
        if mpp is None and self._tif.is_ome:
            mpp = ome_mpp(self._tif.ome_metadata or "")
        decoder = {"reader": f"tifffile {tifffile.__version__}", "imagecodecs": imagecodecs.__version__,
                   "compression": str(page.compression.name)}
        codec_version = {"JPEG": "jpeg8", "APERIO_JP2000_RGB": "jpeg2k", "APERIO_JP2000_YCBC": "jpeg2k",
                         "JPEG2000": "jpeg2k", "JPEGXL": "jpegxl", "WEBP": "webp"}.get(page.compression.name)
        if codec_version and hasattr(imagecodecs, f"{codec_version}_version"):
            decoder["pixel_decoder"] = getattr(imagecodecs, f"{codec_version}_version")()
        return SlideInfo(vendor=props.get("openslide.vendor", "svs" if self._tif.is_svs else "tiff"),
                         properties=props, mpp=mpp, objective_power=objective_power(props),
                         icc_profile=bytes(icc.value) if icc is not None else None,
                         background=background(props), decoder=decoder)

    def _associated_series(self) -> dict[str, object]:
        found = {}
        for series in self._tif.series:
            if series is self._series:
                continue
            name = (series.name or "").lower()
            if name in ASSOCIATED_NAMES and series.dtype == np.uint8 and series.shape[-1] == 3:
                found[name] = series
        return found

    def associated_names(self) -> list[str]:
        return sorted(self._associated_series())

    def associated(self, name: str) -> np.ndarray:
        return np.ascontiguousarray(self._associated_series()[name].asarray())

    def _page(self, level: int | str):
        series = self._associated_series()[level] if isinstance(level, str) else self._series.levels[level]
        return series.pages[0] if len(series.pages) == 1 else None

    def source_segments(self, level: int | str) -> SourceSegments | None:
        from .storage.source_tiles import MAX_TILE, page_coding
        page = self._page(level)
        if page is None or page.is_tiled and page.imagedepth > 1:
            return None
        coding = page_coding(page)
        if coding is None:
            return None
        if coding.header is not None:  # NDPI: restart intervals as tiles, stacked into square chunks
            height, width = page.tilelength, page.tilewidth
            if width % height or not 16 <= width <= MAX_TILE:
                return None
            across = -(-page.imagewidth // width)
            if len(page.dataoffsets) != -(-page.imagelength // height) * across:
                return None
            return SourceSegments(coding, height, width, across, len(page.dataoffsets), stack=width // height)
        if page.is_tiled:
            height, width = page.tilelength, page.tilewidth
            across = -(-page.imagewidth // width)
        else:
            height, width, across = min(page.rowsperstrip, page.imagelength), page.imagewidth, 1
        if not (16 <= height <= MAX_TILE and 16 <= width <= MAX_TILE) or page.is_tiled and height != width:
            return None
        if len(page.dataoffsets) != -(-page.imagelength // height) * across:
            return None
        return SourceSegments(coding, height, width, across, len(page.dataoffsets), tiled=page.is_tiled)

    def strip_recipe(self, name: str) -> dict | None:
        from .storage.tiff_strips import strip_recipe
        page = self._page(name)
        return strip_recipe(page) if page is not None else None

    def segment_offsets(self, level: int | str) -> tuple[np.ndarray, np.ndarray]:
        page = self._page(level)
        return np.asarray(page.dataoffsets, dtype=np.int64), np.asarray(page.databytecounts, dtype=np.int64)

    def read_segments(self, level: int | str, indices: list[int]) -> list[bytes]:
        page = self._page(level)
        handle = self._tif.filehandle
        out = []
        with handle.lock:
            for i in indices:
                handle.seek(page.dataoffsets[i])
                out.append(handle.read(page.databytecounts[i]))
        return out

    def close(self) -> None:
        self._tif.close()


class OpenSlideSlide(Slide):
    """Every format OpenSlide reads (NDPI, MRXS, SCN, Philips, Ventana, generic tiled TIFF, ...).

    OpenSlide addresses regions in level-0 pixels, so a level whose downsample is not an integer
    cannot be read exactly at arbitrary offsets (OpenSlide resamples by the fractional remainder).
    Such levels are left out and listed in ``skipped_levels``; tifffile reads them exactly.
    """

    backend = "openslide"

    def __init__(self, path: Path):
        import openslide
        super().__init__(path)
        try:
            self._slide = openslide.OpenSlide(str(path))
        except Exception as exc:
            raise SlideError(f"{path.name}: OpenSlide cannot open it ({type(exc).__name__}: {exc})") from exc
        self._level_index: list[int] = []
        for i, ((w, h), ds) in enumerate(zip(self._slide.level_dimensions, self._slide.level_downsamples)):
            if i and abs(ds - round(ds)) > 1e-6:
                self.skipped_levels.append({"level": i, "width": w, "height": h, "downsample": ds,
                                            "reason": "non-integer downsample: OpenSlide cannot read it exactly"})
                continue
            self._level_index.append(i)
            self.levels.append(Level(w, h, float(ds)))
        props = dict(self._slide.properties)
        icc = self._slide.color_profile
        self.info = SlideInfo(vendor=props.get("openslide.vendor", "unknown"), properties=props, mpp=mpp_from(props),
                              objective_power=objective_power(props),
                              icc_profile=icc.tobytes() if icc is not None else None,
                              background=background(props),
                              decoder={"reader": f"openslide-python {openslide.__version__}",
                                       "openslide": openslide.__library_version__})

    def _read(self, level, y0, y1, x0, x1):
        source_level = self._level_index[level]
        ds = self.levels[level].downsample
        rgba = np.asarray(self._slide.read_region((round(x0 * ds), round(y0 * ds)), source_level, (x1 - x0, y1 - y0)))
        return composite(rgba, self.info.background)

    def associated_names(self) -> list[str]:
        return sorted(n for n in self._slide.associated_images if n in ASSOCIATED_NAMES)

    def associated(self, name: str) -> np.ndarray:
        return composite(np.asarray(self._slide.associated_images[name]), self.info.background)

    def close(self) -> None:
        self._slide.close()


def check_bif_overlap(name: str, tif) -> None:
    """tifffile lays a BIF's tiles side by side: overlapping ones (XMP TileJointInfo) need OpenSlide's stitching."""
    import re
    for page in tif.pages:
        xmp = page.tags.get(700)
        text = xmp.value.decode("utf-8", "replace") if xmp is not None and isinstance(xmp.value, bytes) else ""
        if any(int(v) for v in re.findall(r'Overlap[XY]="(-?\d+)"', text)):
            raise SlideError(f"{name}: a Ventana BIF whose tiles overlap; tifffile does not stitch them: pack it "
                             "with --backend openslide")


def main_series(tif):
    """The slide's pyramid among a TIFF's series: the first, except in Leica SCN files, whose images
    (a macro, then the scanned regions) come in the XML's order: there the largest is the slide."""
    if tif.is_scn and len(tif.series) > 1:
        return max(tif.series, key=lambda s: (int(np.prod(s.levels[0].shape[:2])), -tif.series.index(s)))
    return tif.series[0]


@contextmanager
def tifffile_errors() -> Iterator[list[str]]:
    """Collect the errors tifffile logs (and otherwise skips over) while a file is parsed."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("tifffile")
    handler = Collect(logging.ERROR)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def halve(image: np.ndarray) -> np.ndarray:
    """A pyramid's next level of an (h, w, 3) uint8 image: 2x2 means rounded half up (odd edges dropped)."""
    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    blocks = image[:h, :w].astype(np.uint32).reshape(h // 2, 2, w // 2, 2, 3).sum(axis=(1, 3))
    return ((blocks + 2) // 4).astype(np.uint8)


def composite(rgba: np.ndarray, background_rgb: tuple[int, int, int]) -> np.ndarray:
    """OpenSlide's RGBA (not premultiplied) over the slide's background colour, exactly in integers.

    Outside the scanned area OpenSlide returns alpha 0 and RGB 0: that is background, not black tissue.
    """
    if rgba.shape[-1] == 3:
        return rgba
    alpha = rgba[..., 3:4].astype(np.uint32)
    if (alpha == 255).all():
        return np.ascontiguousarray(rgba[..., :3])
    bg = np.asarray(background_rgb, dtype=np.uint32)
    rgb = rgba[..., :3].astype(np.uint32)
    return ((rgb * alpha + bg * (255 - alpha) + 127) // 255).astype(np.uint8)


def openslide_properties(path: Path) -> dict[str, str]:
    """OpenSlide's vendor properties where OpenSlide reads the file; else empty."""
    try:
        import openslide
        with openslide.OpenSlide(str(path)) as slide:
            return dict(slide.properties)
    except Exception:
        return {}


def mpp_from(props: dict[str, str]) -> tuple[float, float] | None:
    try:
        x, y = float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"])
    except (KeyError, ValueError):
        return None
    return (x, y) if x > 0 and y > 0 and math.isfinite(x) and math.isfinite(y) else None


def ome_mpp(ome_xml: str) -> tuple[float, float] | None:
    import re
    x = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', ome_xml)
    y = re.search(r'PhysicalSizeY="([0-9.eE+-]+)"', ome_xml)
    return (float(x.group(1)), float(y.group(1))) if x and y else None


def objective_power(props: dict[str, str]) -> float | None:
    try:
        return float(props["openslide.objective-power"])
    except (KeyError, ValueError):
        return None


def background(props: dict[str, str]) -> tuple[int, int, int]:
    hex_rgb = props.get("openslide.background-color", "FFFFFF")
    try:
        return tuple(int(hex_rgb[i:i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]
    except ValueError:
        return (255, 255, 255)


def open_slide(path: str | Path, backend: str = "auto") -> Slide:
    """Open a slide file, refusing anything that is not an 8-bit RGB slide with one clear message."""
    path = Path(path)
    if backend not in (*BACKENDS, "dicom"):
        raise SlideError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not path.exists():
        raise SlideError(f"{path}: no such file")
    if path.is_dir():
        from .dicom_slide import DicomSlide, is_dicom
        if backend in ("auto", "dicom") and any(p.is_file() and is_dicom(p) for p in path.iterdir()):
            return check_size(DicomSlide(path))  # a DICOM series: its instances are the levels
        raise SlideError(f"{path}: is a folder, not a slide file (MRXS: give the .mrxs file beside its folder)")
    with open(path, "rb") as f:
        head = f.read(132)
    if not head:
        raise SlideError(f"{path}: empty file")
    if head[128:132] == b"DICM" and backend in ("auto", "dicom"):  # DICOM WSI: pydicom reads its frames
        from .dicom_slide import DicomSlide
        return check_size(DicomSlide(path))
    is_tiff = head[:4] in _TIFF_MAGIC
    if backend == "tifffile" or (backend == "auto" and is_tiff):
        if not is_tiff and backend == "tifffile":
            raise SlideError(f"{path.name}: not a TIFF file; try --backend openslide")
        slide: Slide = TiffSlide(path)
    else:
        if is_tiff:  # OpenSlide turns grayscale, 16-bit and RGBA TIFFs into RGBA: refuse them here too
            TiffSlide(path).close()
        import openslide
        if openslide.OpenSlide.detect_format(str(path)) is None:
            raise SlideError(f"{path.name}: not a slide format wsi-idf can read (tifffile and OpenSlide both refuse it)")
        slide = OpenSlideSlide(path)
    return check_size(slide)


def check_size(slide: Slide) -> Slide:
    """A slide needs a level with pixels; one smaller than a patch is coded as one padded edge patch."""
    if not slide.levels or min(slide.levels[0].width, slide.levels[0].height) < 1:
        slide.close()
        raise SlideError(f"{slide.path.name}: no readable pyramid level")
    return slide


_handles: dict[SlideRef, Slide] = {}
_handles_lock = threading.Lock()


def cached_slide(ref: SlideRef) -> Slide:
    """The slide ``ref`` names, opened once per process (handles cannot travel between processes)."""
    with _handles_lock:
        slide = _handles.get(ref)
        if slide is None:
            slide = _handles[ref] = open_slide(ref.path, ref.backend)
        return slide


def level_as_dask(ref: SlideRef, level: int, chunk: int = 1024):
    """One pyramid level as a lazy (h, w, 3) uint8 Dask array; each block is read in its own task."""
    import dask.array as da
    lv = cached_slide(ref).levels[level]

    def read_block(block_info=None):
        (y0, y1), (x0, x1), _ = block_info[None]["array-location"]
        return cached_slide(ref).read(level, y0, y1, x0, x1)

    chunks = (normal_chunks(lv.height, chunk), normal_chunks(lv.width, chunk), (3,))
    return da.map_blocks(read_block, chunks=chunks, dtype=np.uint8, meta=np.empty((0, 0, 0), np.uint8),
                         name=f"read-{Path(ref.path).name}-{ref.backend}-{level}")


def normal_chunks(size: int, chunk: int) -> tuple[int, ...]:
    return tuple(min(chunk, size - start) for start in range(0, size, chunk))
