"""Test slides built from the real H&E tiles in ../shared/data (tifffile writes them).

``mosaic`` lays real 1000x1000 MoNuSeg tiles side by side (each flipped or rotated by the seed),
so the pixels are real tissue at any size. Pyramids are 2x box downsamples of level 0.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

from conftest import DATA
from wsi_idf.model.data import read_rgb
from wsi_idf.slide import halve

TILE_FOLDER = DATA / "tiles" / "train" / "monuseg"
SLIDES = DATA / "slides"
CMU_SVS = SLIDES / "cmu-1-small-region.svs"
TCGA_SVS = SLIDES / "tcga-cr-7395-01a-01-ts1.svs"
DICOM = SLIDES / "small_dicom.dcm"
NDPI = sorted((SLIDES / "ndpi").glob("*.ndpi"))
NDPI_DAPI = SLIDES / "ndpi" / "test3-dapi-2-387.ndpi"


def mosaic(height: int, width: int, seed: int = 0) -> np.ndarray:
    """An (height, width, 3) uint8 image of real tissue tiles."""
    paths = sorted(TILE_FOLDER.glob("*.tif"))
    rng = np.random.default_rng(seed)
    out = np.empty((height, width, 3), dtype=np.uint8)
    for y in range(0, height, 1000):
        for x in range(0, width, 1000):
            tile = read_rgb(paths[int(rng.integers(len(paths)))])
            tile = np.rot90(tile, int(rng.integers(4)))
            h, w = min(1000, height - y), min(1000, width - x)
            out[y:y + h, x:x + w] = tile[:h, :w]
    return out


def pyramid(base: np.ndarray, levels: int) -> list[np.ndarray]:
    out = [base]
    for _ in range(levels - 1):
        out.append(halve(out[-1]))
    return out


def write_pyramidal_tiff(path: Path, levels: list[np.ndarray], mpp: float = 0.25, tile: int = 256) -> Path:
    """Tiled levels as successive top-level IFDs (reduced ones subfiletype 1): both tifffile and OpenSlide
    ("generic-tiff") see every level."""
    res = (1e4 / mpp, 1e4 / mpp)
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        for i, image in enumerate(levels):
            tif.write(image, tile=(tile, tile), photometric="rgb", compression="zlib",
                      subfiletype=1 if i else 0, resolution=res, resolutionunit="CENTIMETER")
    return path


def write_ome_tiff(path: Path, levels: list[np.ndarray], mpp: float = 0.5, tile: int = 256) -> Path:
    """An OME-TIFF pyramid: reduced levels in SubIFDs (tifffile sees them, OpenSlide only level 0)."""
    with tifffile.TiffWriter(path, ome=True, bigtiff=True) as tif:
        tif.write(levels[0], tile=(tile, tile), photometric="rgb", compression="zlib", subifds=len(levels) - 1,
                  metadata={"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp})
        for image in levels[1:]:
            tif.write(image, tile=(tile, tile), photometric="rgb", compression="zlib", subfiletype=1)
    return path


def write_mosaic_pyramid(path: Path, width: int, height: int, levels: int = 4, seed: int = 0, tile: int = 512,
                         quality: int = 90, compression: str | None = "jpeg") -> Path:
    """A slide of any size (gigapixels) streamed tile by tile, never held whole in memory.

    Level k is a mosaic of the real MoNuSeg tiles box-downsampled by 2^k, each grid cell a tile
    picked and rotated by the seed; JPEG-compressed like a scanner's SVS (``compression=None``:
    uncompressed, readable without imagecodecs). Both tifffile and OpenSlide read every level.
    """
    paths = sorted(TILE_FOLDER.glob("*.tif"))
    sources = [[read_rgb(p)[:1000, :1000]] for p in paths]
    for pyr in sources:
        for _ in range(levels - 1):
            pyr.append(halve(pyr[-1]))
    cell = 1000
    rng = np.random.default_rng(seed)
    cols, rows = -(-width // cell), -(-height // cell)
    picks = rng.integers(len(paths), size=(rows, cols))
    turns = rng.integers(4, size=(rows, cols))

    def tiles(k: int):
        c = cell >> k
        h, w = -(-height // 2**k), -(-width // 2**k)
        for ty in range(0, h, tile):
            for tx in range(0, w, tile):
                out = np.zeros((tile, tile, 3), np.uint8)
                for gy in range(ty // c, min(rows, -(-(ty + tile) // c))):
                    for gx in range(tx // c, min(cols, -(-(tx + tile) // c))):
                        src = np.rot90(sources[picks[gy, gx]][k], turns[gy, gx])
                        y0, x0 = max(ty, gy * c), max(tx, gx * c)
                        y1, x1 = min(ty + tile, (gy + 1) * c, h), min(tx + tile, (gx + 1) * c, w)
                        out[y0 - ty:y1 - ty, x0 - tx:x1 - tx] = src[y0 - gy * c:y1 - gy * c, x0 - gx * c:x1 - gx * c]
                yield out

    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for k in range(levels):
            shape = (-(-height // 2**k), -(-width // 2**k), 3)
            tif.write(tiles(k), shape=shape, dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                      compression=compression, compressionargs={"level": quality} if compression == "jpeg" else None,
                      subfiletype=1 if k else 0,
                      resolution=(1e4 / (0.25 * 2**k), 1e4 / (0.25 * 2**k)), resolutionunit="CENTIMETER")
    return path


def small_slide_and_archive(work: Path, seed: int, shard: int) -> tuple[Path, list[np.ndarray], Path]:
    """A 400x560 two-level pyramidal TIFF of real tissue and its archive in small shards (many shards,
    so damage and faults land everywhere): the fault and hostile-archive tests' material."""
    from wsi_idf.jobs.pack import pack_slide
    levels = pyramid(mosaic(400, 560, seed=seed), 2)
    slide = write_pyramidal_tiff(work / "slide.tif", levels)
    archive = work / "reference.zarr"
    pack_slide(slide, archive, shard=shard, scheduler="synchronous")
    return slide, levels, archive
