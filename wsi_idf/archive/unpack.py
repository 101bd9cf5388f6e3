"""Out of the archive: a tiled pyramidal TIFF (unpack), one region as an image, and a summary (info)."""
from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .layout import Archive, open_archive
from ..errors import ArchiveError
from ..outputs import SOFTWARE, check_output

TIFF_TILE = 256
STRIP = 1280  # rows decoded at once: a multiple of both the TIFF tile and the 80-pixel patch


def _tiles(archive: Archive, level: int, progress) -> Iterator[np.ndarray]:
    """Level tiles in row-major order, padded to full tiles; one 1280-row strip decoded at a time."""
    reader = archive.reader(level)  # checked: a missing or moved chunk raises instead of giving zeros
    height, width = reader.height, reader.width
    for y in range(0, height, STRIP):
        strip, _ = reader.region(0, y, width, min(STRIP, height - y))
        progress.update(strip.shape[0] * width)
        for ty in range(0, strip.shape[0], TIFF_TILE):
            for x in range(0, width, TIFF_TILE):
                tile = strip[ty:ty + TIFF_TILE, x:x + TIFF_TILE]
                if tile.shape[:2] != (TIFF_TILE, TIFF_TILE):
                    tile = np.pad(tile, ((0, TIFF_TILE - tile.shape[0]), (0, TIFF_TILE - tile.shape[1]), (0, 0)))
                yield tile


def unpack_archive(path: str | Path, out: str | Path, overwrite: bool = False, progress: bool = False) -> dict:
    """Write the archive as a tiled pyramidal TIFF (deflate), pixel-identical, that OpenSlide, tifffile
    and QuPath/Bio-Formats all read with every level.

    The levels are successive top-level IFDs, the reduced ones marked as such (subfiletype 1), as
    libvips writes pyramids: OpenSlide ("generic-tiff") and tifffile see the pyramid, which OME-TIFF's
    SubIFDs hide from OpenSlide. Resolution tags carry the MPP (per level), level 0 the ICC
    profile; the label, macro and thumbnail follow as untiled images named in their ImageDescription.
    Written to a temporary name and renamed, so a failed unpack leaves nothing behind.
    """
    import tifffile
    from tqdm import tqdm
    archive = open_archive(path)
    out = Path(out)
    check_output(out, overwrite, "image", (archive.path,))
    meta = archive.metadata
    mpp = archive.mpp
    icc = meta["slide"].get("icc_profile")
    extratags = [(34675, 7, None, base64.b64decode(icc), True)] if icc else []
    total = sum(lv["width"] * lv["height"] for lv in meta["levels"])
    tmp = out.with_name(f".{out.name}.partial")
    options = dict(tile=(TIFF_TILE, TIFF_TILE), compression="zlib", predictor=True, photometric="rgb",
                   dtype=np.uint8, software=SOFTWARE, metadata=None)
    try:
        with tqdm(total=total, unit="px", unit_scale=True, desc="unpacking", disable=None if progress else True, leave=False) as bar, \
                tifffile.TiffWriter(tmp, bigtiff=True) as tif:
            for level, lv in enumerate(meta["levels"]):
                resolution = {}
                if mpp:  # pixels per centimetre at this level
                    resolution = dict(resolution=(1e4 / (mpp[0] * lv["downsample"]), 1e4 / (mpp[1] * lv["downsample"])),
                                      resolutionunit="CENTIMETER")
                tif.write(_tiles(archive, level, bar), shape=(lv["height"], lv["width"], 3),
                          subfiletype=0 if level == 0 else 1, description=f"{meta['source']['name']} level {level}",
                          extratags=extratags if level == 0 else [], **resolution, **options)
            for name in meta["associated"]:
                tif.write(archive.associated(name), photometric="rgb", compression="zlib", subfiletype=1,
                          description=name, software=SOFTWARE, metadata=None)
        tmp.replace(out)
    except OSError as exc:
        raise ArchiveError(f"cannot write {out}: {exc.strerror or exc}") from exc
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only folder: nothing was written there either
            pass
    return {"archive": str(archive.path), "tiff": str(out), "levels": len(meta["levels"]),
            "associated": meta["associated"], "bytes": out.stat().st_size}


LOSSLESS_SUFFIXES = {".png", ".tif", ".tiff"}
REGION_MAX_PIXELS = 2**26  # 64 Mpx, e.g. 8192 x 8192: about 0.6 GB of memory while written


def write_region(path: str | Path, out: str | Path, level: int, x: int, y: int, width: int, height: int,
                 flow_levels: int | None = None, overwrite: bool = False) -> dict:
    """One region of one level as PNG (or TIFF for a .tif/.tiff name); decodes only the patches it touches.
    ``flow_levels`` < the model's gives a progressive preview from fewer bytes. Lossy formats are refused:
    the pixels are exact, and a JPEG of them would not be."""
    out = Path(out)
    if out.suffix.lower() not in LOSSLESS_SUFFIXES:
        raise ArchiveError(f"{out.name}: write regions as .png or .tif (lossless); a lossy format would not "
                           "keep the archive's exact pixels")
    if width * height > REGION_MAX_PIXELS:
        raise ArchiveError(f"a region of {width}x{height} pixels is over the {REGION_MAX_PIXELS // 2**20} Mpx a region "
                           "may have (it is held in memory about 3 times over); cut it in pieces, or write whole "
                           "levels with `wsi-idf unpack`, which streams them")
    check_output(out, overwrite, "image", (Path(path),))
    archive = open_archive(path)
    pixels, bytes_read = archive.reader(level).region(x, y, width, height, flow_levels)
    try:
        if out.suffix.lower() in {".tif", ".tiff"}:
            import tifffile
            tifffile.imwrite(out, pixels, photometric="rgb", compression="zlib", software=SOFTWARE)
        else:
            from PIL import Image, PngImagePlugin
            text = PngImagePlugin.PngInfo()
            text.add_text("Software", SOFTWARE)
            Image.fromarray(pixels).save(out, pnginfo=text)
    except OSError as exc:
        raise ArchiveError(f"cannot write {out}: {exc.strerror or exc}") from exc
    return {"archive": str(archive.path), "out": str(out), "level": level, "x": x, "y": y, "width": width,
            "height": height, "flow_levels": flow_levels, "bytes_read": bytes_read if flow_levels is not None else None}


def archive_info(path: str | Path) -> dict:
    """What an archive holds: source and provenance, levels, model, sizes, physical pixel size."""
    archive = open_archive(path)
    meta = archive.metadata
    sizes = meta.sizes(archive.path)
    coded = sum(lv["encoded_bytes"] for lv in meta["levels"])
    if coded > sizes["archive_bytes"]:  # the metadata would be believed and printed
        from ..errors import DamagedArchiveError
        raise DamagedArchiveError(f"{archive.path}: the archive metadata is damaged or forged: its levels claim "
                                  f"{coded:,} bytes and the whole archive holds {sizes['archive_bytes']:,}")
    slide = meta["slide"]
    return {"archive": str(archive.path), "zarr_format": archive.zarr_format, "wsi_idf_version": meta["wsi_idf_version"],
            "source": meta["source"], "model": meta["model"],
            "levels": [{**{k: lv[k] for k in ("path", "width", "height", "downsample", "encoded_bytes")},
                        "storage": lv.get("storage", "idf"), "source_codec": lv.get("source_codec")}
                       for lv in meta["levels"]],
            "skipped_levels": meta["skipped_levels"], "mpp": slide["mpp"], "objective_power": slide["objective_power"],
            "vendor": slide["vendor"], "icc_profile": bool(slide.get("icc_profile")),
            "associated": meta["associated"], "label_dropped": meta["label_dropped"],
            "properties": len(slide["properties"]), **{k: v for k, v in sizes.items() if k != "source_bytes"},
            "source_lossy": meta.source_lossy,
            "restore": meta.restore_info(), **meta.model_facts()}
