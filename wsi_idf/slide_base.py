"""What every slide reader is: levels, metadata, associated images, and the source's own segments.

``wsi_idf.slide`` has the TIFF and OpenSlide readers and ``open_slide``; ``wsi_idf.dicom_slide``
the DICOM reader. They share this base, so neither imports the other.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import SlideError


@dataclass(frozen=True)
class Level:
    width: int
    height: int
    downsample: float  # relative to level 0, as OpenSlide reports it (mean of x and y)


@dataclass(frozen=True)
class SlideRef:
    """What a worker needs to open the same slide again: picklable, unlike the handles."""
    path: str
    backend: str


@dataclass
class SlideInfo:
    """Everything about a slide except its pixels."""
    vendor: str
    properties: dict[str, str]
    mpp: tuple[float, float] | None  # (x, y) micrometres per pixel at level 0
    objective_power: float | None
    icc_profile: bytes | None
    background: tuple[int, int, int]
    decoder: dict[str, str] = field(default_factory=dict)  # reader and pixel decoder versions

    def to_json(self) -> dict:
        return {"vendor": self.vendor, "mpp": list(self.mpp) if self.mpp else None,
                "objective_power": self.objective_power, "background": list(self.background),
                "icc_profile": base64.b64encode(self.icc_profile).decode() if self.icc_profile else None,
                "properties": self.properties, "decoder": self.decoder}


@dataclass(frozen=True)
class SourceSegments:
    """A level's (or associated image's) own compressed tiles or strips, as stored in the file."""
    coding: object  # source_tiles.TileCoding
    height: int  # of a tile, or rows per strip
    width: int
    across: int  # tiles per row (1 for strips)
    count: int
    stack: int = 1  # restart intervals (NDPI) stacked into one square chunk, one above the other
    tiled: bool = True  # False: strips (the last one may be short); tiles at an edge are whole tiles

    @property
    def chunk_height(self) -> int:
        return self.height * self.stack


class Slide:
    """One open slide. Subclasses implement ``_read`` for their backend."""

    backend = ""

    def __init__(self, path: Path):
        self.path = path
        self.files = [path]  # the source files, in the order restore data lists them
        self.levels: list[Level] = []
        self.skipped_levels: list[dict] = []  # source levels a backend cannot read exactly
        self.info: SlideInfo

    @property
    def ref(self) -> SlideRef:
        return SlideRef(str(self.path.resolve()), self.backend)

    def read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels ``[y0:y1, x0:x1]`` of ``level`` as (h, w, 3) uint8, read from the source file."""
        lv = self.levels[level]
        if not (0 <= y0 < y1 <= lv.height and 0 <= x0 < x1 <= lv.width):
            raise SlideError(f"region y {y0}:{y1}, x {x0}:{x1} is outside level {level} "
                             f"({lv.width}x{lv.height})")
        try:
            region = self._read(level, y0, y1, x0, x1)
        except SlideError:
            raise
        except Exception as exc:  # decoder errors on damaged tiles, truncated files
            raise SlideError(f"{self.path.name}: cannot read level {level} at x={x0}, y={y0} "
                             f"({type(exc).__name__}: {exc}); the file may be truncated or damaged") from exc
        return np.ascontiguousarray(region, dtype=np.uint8)

    def _read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        raise NotImplementedError

    def associated_names(self) -> list[str]:
        raise NotImplementedError

    def associated(self, name: str) -> np.ndarray:
        """A label, macro or thumbnail image as (h, w, 3) uint8."""
        raise NotImplementedError

    def source_segments(self, level: int | str) -> SourceSegments | None:
        """How a level (or an associated image, by name) is compressed in the file, when its own
        tiles or strips can be kept (``--codec source``); None when only its pixels can be coded."""
        return None

    def read_segments(self, level: int | str, indices: list[int]) -> list[bytes]:
        """The stored bytes of tiles or strips ``indices`` of a level or associated image."""
        raise NotImplementedError

    def segment_offsets(self, level: int | str) -> tuple[np.ndarray, np.ndarray]:
        """File offsets and byte counts of every tile or strip of a level or associated image."""
        raise NotImplementedError

    def segment_file(self, level: int | str) -> int:
        """Which of ``files`` holds a level's (or associated image's) segments."""
        return 0

    def strip_recipe(self, name: str) -> dict | None:
        """How an associated image's strips are made again from its pixels (``storage.tiff_strips``), if they can."""
        return None

    def close(self) -> None:
        pass

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_rgb8(name: str, dtype: np.dtype, shape: tuple[int, ...], axes: str) -> None:
    samples = shape[-1] if axes.endswith("S") else 1
    if len(shape) != 3 or samples not in (3,) or np.dtype(dtype) != np.uint8:
        kind = {1: "grayscale", 2: "grayscale with alpha", 3: "RGB", 4: "RGBA"}.get(samples, f"{samples}-sample")
        bits = np.dtype(dtype).itemsize * 8
        raise SlideError(f"{name}: wsi-idf archives 8-bit RGB slides; this one is {bits}-bit {kind} "
                         f"(shape {tuple(shape)}, axes {axes})")


