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


def _jpeg_levels(seed: int, height: int, width: int, levels: int = 3) -> list[np.ndarray]:
    return pyramid(mosaic(height, width, seed=seed), levels)


def write_philips_tiff(path: Path, height: int = 700, width: int = 900, tile: int = 256, seed: int = 3) -> Path:
    """A Philips TIFF as its scanner writes one: JPEG tiles, reduced levels padded to whole tiles with
    white (their true size is in the DICOM_PIXEL_SPACING of the XML ImageDescription), a macro and a
    label strip image. tifffile and OpenSlide both read it ("philips")."""
    levels = _jpeg_levels(seed, height, width)
    spacing = "".join(
        '<DataObject ObjectType="PixelDataRepresentation"><Attribute Name="DICOM_PIXEL_SPACING" Group="0x0028" '
        f'Element="0x0030" PMSVR="IDoubleArray">&quot;{0.00025 * 2**k:g}&quot; &quot;{0.00025 * 2**k:g}&quot;'
        '</Attribute></DataObject>' for k in range(len(levels)))
    xml = ('<?xml version="1.0" encoding="UTF-8" ?><DataObject ObjectType="DPUfsImport">'
           '<Attribute Name="DICOM_MANUFACTURER" Group="0x0008" Element="0x0070" PMSVR="IString">PHILIPS</Attribute>'
           '<Attribute Name="PIM_DP_SCANNED_IMAGES" Group="0x301D" Element="0x1003" PMSVR="IDataObjectArray"><Array>'
           '<DataObject ObjectType="DPScannedImage"><Attribute Name="PIM_DP_IMAGE_TYPE" Group="0x301D" '
           'Element="0x1004" PMSVR="IString">WSI</Attribute><Attribute Name="PIIM_PIXEL_DATA_REPRESENTATION_SEQUENCE" '
           'Group="0x1001" Element="0x8B01" PMSVR="IDataObjectArray"><Array>' + spacing +
           '</Array></Attribute></DataObject></Array></Attribute></DataObject>')

    def padded(image: np.ndarray) -> np.ndarray:
        out = np.full((-(-image.shape[0] // tile) * tile, -(-image.shape[1] // tile) * tile, 3), 255, np.uint8)
        out[:image.shape[0], :image.shape[1]] = image
        return out

    with tifffile.TiffWriter(path) as tif:
        for k, image in enumerate(levels):
            tif.write(image if k == 0 else padded(image), tile=(tile, tile), photometric="rgb", compression="jpeg",
                      compressionargs={"level": 90}, description=xml if k == 0 else None,
                      software="Philips DP v1.0", subfiletype=1 if k else 0, metadata=None)
        for name, image in (("Macro", levels[-1][:100]), ("Label", levels[-1][:80, :120])):
            tif.write(image, photometric="rgb", compression="jpeg", description=name, software="Philips DP v1.0",
                      metadata=None)
    return path


def write_leica_scn(path: Path, height: int = 768, width: int = 1024, seed: int = 5) -> Path:
    """A Leica SCN file: BigTIFF, an XML collection whose first image is a tiled JPEG macro, then the
    main image's JPEG pyramid (IFDs 1-3). tifffile lists the macro first; OpenSlide opens it ("leica")."""
    levels = _jpeg_levels(seed, height, width)
    macro = levels[-1][:120, :200]
    device = '<device model="Leica SCN400;Leica SCN" version="1.5.1.10864 2012/05/10 13:29:07;1.5.1.10864"/>'

    def image(name: str, dims: str, view: int, objective: str) -> str:
        return (f'<image name="{name}" uuid="urn:uuid:{name}"><creationDate>2026-12-06T00:00:00.00Z</creationDate>'
                f'{device}<pixels sizeX="{dims.split()[0]}" sizeY="{dims.split()[1]}">{dims.split(" ", 2)[2]}</pixels>'
                f'<view sizeX="{width * view}" sizeY="{height * view}" offsetX="0" offsetY="0" spacingZ="0"/>'
                f'<scanSettings><objectiveSettings><objective>{objective}</objective></objectiveSettings>'
                '<illuminationSettings><numericalAperture>0.4</numericalAperture><illuminationSource>brightfield'
                '</illuminationSource></illuminationSettings></scanSettings></image>')
    main_dims = "".join(f'<dimension sizeX="{width >> k}" sizeY="{height >> k}" r="{k}" ifd="{k + 1}"/>'
                        for k in range(len(levels)))
    xml = ('<?xml version="1.0" encoding="utf-8"?><scn xmlns="http://www.leica-microsystems.com/scn/2010/10/01">'
           f'<collection name="test" uuid="urn:uuid:c" sizeX="{width * 1000}" sizeY="{height * 1000}">'
           + image("macro", '200 120 <dimension sizeX="200" sizeY="120" r="0" ifd="0"/>', 1000, "0.625")
           + image("main", f"{width} {height} {main_dims}", 500, "20") + '</collection></scn>')
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(macro, tile=(256, 256), photometric="rgb", compression="jpeg", description=xml, metadata=None)
        for image_ in levels:
            tif.write(image_, tile=(256, 256), photometric="rgb", compression="jpeg", compressionargs={"level": 90},
                      metadata=None)
    return path


def write_ome_jpeg_pyramid(path: Path, height: int = 700, width: int = 900, seed: int = 3) -> Path:
    """An OME-TIFF pyramid of JPEG tiles, reduced levels in SubIFDs (tifffile reads every level)."""
    levels = _jpeg_levels(seed, height, width)
    with tifffile.TiffWriter(path, ome=True, bigtiff=True) as tif:
        tif.write(levels[0], tile=(256, 256), photometric="rgb", compression="jpeg", compressionargs={"level": 90},
                  subifds=len(levels) - 1, metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
        for image in levels[1:]:
            tif.write(image, tile=(256, 256), photometric="rgb", compression="jpeg", compressionargs={"level": 90},
                      subfiletype=1)
    return path


def write_ventana_bif(path: Path, height: int = 768, width: int = 1024, seed: int = 6, joints: bytes = b"") -> Path:
    """A Ventana BIF: BigTIFF, iScan XMP (tag 700), a label and a thumbnail strip image, then the JPEG
    pyramid pages ("level=N mag=M quality=Q"), tiles that do not overlap (tifffile reads them side by side)."""
    levels = _jpeg_levels(seed, height, width)
    xmp = (b'<?xml version="1.0" encoding="utf-8"?><Metadata><iScan Magnification="20" ScanRes="0.465" '
           b'ScannerModel="VENTANA DP 200" />' + joints + b'</Metadata>')
    software, tag = "ScanOutputManager 1.1.0.15854", [(700, 1, len(xmp), xmp, True)]
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(levels[-1][:, :150], photometric="rgb", compression="jpeg", description="Label_Image",
                  software=software, extratags=tag, metadata=None)
        tif.write(levels[-1], photometric="rgb", compression="jpeg", description="Thumbnail", software=software,
                  metadata=None)
        for k, image in enumerate(levels):
            tif.write(image, tile=(256, 256), photometric="rgb", compression="jpeg", compressionargs={"level": 90},
                      description=f"level={k} mag={20 / 2**k:g} quality=90", software=software,
                      extratags=tag if k == 0 else None, metadata=None)
    return path
