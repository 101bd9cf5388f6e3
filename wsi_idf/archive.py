"""The archive layout: an OME-Zarr multiscale image whose levels use the ``wsi_idf`` codec.

::

    slide.zarr/
      zarr.json            root group: OME-NGFF 0.5 multiscales + omero + "wsi_idf" (provenance, checksums)
      0/ 1/ ...            (3, H, W) uint8 levels, 80x80 inner chunks in shards, codec wsi_idf
      preview/             a small OME-NGFF multiscale image in zstd, for viewers without the codec
      associated/label ... label, macro, thumbnail as (h, w, 3) uint8 in zstd

With ``zarr_format=2`` the same tree is written in Zarr v2 (OME-NGFF 0.4): no sharding, one
file per 80x80 chunk. The root metadata is written last, so an unfinished archive is never a
valid image, and the whole tree is renamed into place only when complete.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import CHANNELS, PATCH
from .errors import ArchiveError

FORMAT_VERSION = 1
PREVIEW_MAX = 1024  # longest side of the preview's first level
PREVIEW_MIN = 256
STANDARD_CHUNK = 512


def level_array_kwargs(height: int, width: int, shard: int, model: str, weights: str, zarr_format: int) -> dict:
    """zarr.create_array arguments for one coded level."""
    common = dict(shape=(CHANNELS, height, width), dtype="uint8", chunks=(CHANNELS, PATCH, PATCH), fill_value=0,
                  zarr_format=zarr_format, overwrite=True)
    if zarr_format == 3:
        from .zarr_codec import WsiIdfCodec
        return dict(common, shards=(CHANNELS, shard, shard), serializer=WsiIdfCodec(model=model, weights=weights),
                    compressors=None, dimension_names=("c", "y", "x"))
    from .codec import WsiIdf
    return dict(common, compressors=WsiIdf(model=model, weights=weights), filters=None,
                chunk_key_encoding={"name": "v2", "separator": "/"})


def standard_array_kwargs(shape: tuple[int, ...], zarr_format: int, dimension_names: tuple[str, ...]) -> dict:
    """zarr.create_array arguments for preview and associated images: zstd, readable everywhere."""
    chunks = tuple(min(s, STANDARD_CHUNK) if s > CHANNELS or len(shape) - i <= 2 else s
                   for i, s in enumerate(shape))
    common = dict(shape=shape, dtype="uint8", chunks=chunks, fill_value=0, zarr_format=zarr_format, overwrite=True)
    if zarr_format == 3:
        from zarr.codecs import ZstdCodec
        return dict(common, compressors=ZstdCodec(level=9), dimension_names=dimension_names)
    from numcodecs import Zstd
    return dict(common, compressors=Zstd(level=9), chunk_key_encoding={"name": "v2", "separator": "/"})


def chunk_path(root: Path, level: int, row: int, col: int, zarr_format: int) -> Path:
    """The file holding shard (row, col) of ``level`` (v3), or chunk (row, col) (v2)."""
    if zarr_format == 3:
        return root / str(level) / "c" / "0" / str(row) / str(col)
    return root / str(level) / "0" / str(row) / str(col)


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary name and rename: a crash leaves either nothing or the whole object."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def ome_multiscale(name: str, datasets: list[tuple[str, float]], mpp: tuple[float, float] | None) -> dict:
    """One OME-NGFF multiscale entry: (path, downsample) per dataset, scales in micrometres when known."""
    unit = {"unit": "micrometer"} if mpp else {}
    px, py = mpp if mpp else (1.0, 1.0)
    return {
        "name": name,
        "axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", **unit},
                 {"name": "x", "type": "space", **unit}],
        "datasets": [{"path": path, "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, py * ds, px * ds]}]} for path, ds in datasets],
    }


OMERO = {"rdefs": {"model": "color"}, "channels": [
    {"label": label, "color": color, "active": True, "window": {"start": 0, "end": 255, "min": 0, "max": 255}}
    for label, color in (("R", "FF0000"), ("G", "00FF00"), ("B", "0000FF"))]}


def write_group(path: Path, attributes: dict, zarr_format: int) -> None:
    """A group's metadata, written directly: creating it through zarr could disturb existing children."""
    if zarr_format == 3:
        write_atomic(path / "zarr.json", json.dumps(
            {"zarr_format": 3, "node_type": "group", "attributes": attributes}, indent=2).encode())
    else:
        write_atomic(path / ".zattrs", json.dumps(attributes, indent=2).encode())
        write_atomic(path / ".zgroup", json.dumps({"zarr_format": 2}).encode())


def image_attributes(multiscale: dict, zarr_format: int, extra: dict | None = None) -> dict:
    """OME-NGFF attributes: 0.5 under ``ome`` for Zarr v3, 0.4 at the top level for v2."""
    if zarr_format == 3:
        attrs = {"ome": {"version": "0.5", "multiscales": [multiscale], "omero": OMERO}}
    else:
        attrs = {"multiscales": [dict(multiscale, version="0.4")], "omero": dict(OMERO, version="0.4")}
    return {**attrs, **(extra or {})}


def read_attributes(path: str | Path) -> tuple[dict, int]:
    """The root attributes of a finished archive and its Zarr format; refuses anything else."""
    path = Path(path)
    if not path.exists():
        raise ArchiveError(f"{path}: no such archive")
    if (path / "zarr.json").is_file():
        meta, fmt = json.loads((path / "zarr.json").read_text()), 3
        attrs = meta.get("attributes", {})
    elif (path / ".zattrs").is_file():
        attrs, fmt = json.loads((path / ".zattrs").read_text()), 2
    else:
        partial = "; it looks like an unfinished pack (finish it with `wsi-idf pack --resume`)" \
            if path.name.endswith(".partial") or (path / ".wsi-idf-pack.json").exists() else ""
        raise ArchiveError(f"{path}: not a wsi-idf archive (no root metadata){partial}")
    meta = attrs.get("wsi_idf")
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise ArchiveError(f"{path}: not a wsi-idf archive (format version {FORMAT_VERSION}), "
                           f"or written by a newer wsi-idf")
    return attrs, fmt


def check_region(level: int, x: int, y: int, width: int, height: int, level_width: int, level_height: int) -> None:
    """A region must lie inside its level: unlike OpenSlide, wsi-idf does not pad with background."""
    if not (0 <= x and 0 <= y and width > 0 and height > 0 and x + width <= level_width
            and y + height <= level_height):
        raise ArchiveError(f"region x={x} y={y} {width}x{height} is outside level {level} ({level_width}x"
                           f"{level_height}); wsi-idf returns only stored pixels (OpenSlide would pad with "
                           "background): clip the region to the level")


@dataclass
class Archive:
    """An open archive: levels as lazy (3, H, W) uint8 Dask arrays, and the archive metadata."""
    path: Path
    zarr_format: int
    levels: list  # dask arrays, level order of the source
    metadata: dict  # the "wsi_idf" attributes: source, provenance, checksums, slide properties
    attributes: dict  # all root attributes (OME-NGFF included)

    @property
    def mpp(self) -> tuple[float, float] | None:
        mpp = self.metadata["slide"].get("mpp")
        return tuple(mpp) if mpp else None

    def region(self, level: int, x: int, y: int, width: int, height: int, levels: int | None = None) -> np.ndarray:
        """Pixels of one region as (height, width, 3) uint8; decodes only the patches it touches.

        ``levels`` below the model's reads and decodes only the coarse flow levels of each patch:
        a progressive preview (see ``wsi_idf.progressive``)."""
        if levels is not None:
            from .progressive import read_region
            return read_region(self.path, level, x, y, width, height, levels)[0]
        arr = self.zarr_level(level)
        _, h, w = arr.shape
        check_region(level, x, y, width, height, w, h)
        return np.ascontiguousarray(arr[:, y:y + height, x:x + width].transpose(1, 2, 0))

    def associated(self, name: str) -> np.ndarray:
        import zarr
        return zarr.open_array(self.path / "associated" / name, mode="r")[...]

    def zarr_level(self, level: int):
        """The Zarr array of one level (what plain ``zarr.open_group(path)[str(level)]`` gives)."""
        import zarr
        return zarr.open_array(self.path / self.metadata["levels"][level]["path"], mode="r")


def open_archive(path: str | Path) -> Archive:
    """Open a finished archive read-only. Each level is a Dask array over the Zarr array."""
    import dask.array as da
    import zarr
    path = Path(path)
    attrs, fmt = read_attributes(path)
    meta = attrs["wsi_idf"]
    levels = []
    for lv in meta["levels"]:
        arr = zarr.open_array(path / lv["path"], mode="r")
        levels.append(da.from_zarr(arr, chunks=(CHANNELS, lv.get("shard", 1280), lv.get("shard", 1280))))
    return Archive(path, fmt, levels, meta, attrs)
