"""The archive layout: an OME-Zarr multiscale image whose levels use the ``wsi_idf`` codec.

::

    slide.zarr/
      zarr.json            root group: OME-NGFF 0.5 multiscales + omero + "wsi_idf" (provenance, checksums)
      0/ 1/ ...            (3, H, W) uint8 levels, 80x80 inner chunks in shards, codec wsi_idf
      preview/             a small OME-NGFF multiscale image in zstd, for viewers without the codec
      associated/label ... label, macro, thumbnail as (h, w, 3) uint8 in zstd

With ``zarr_format=2`` the same tree is written in Zarr v2 (OME-NGFF 0.4): no sharding, one
file per 80x80 chunk (what differs between the two lives in ``wsi_idf.storage.zarr_formats``). The root
metadata is written last, so an unfinished archive is never a valid image, and the whole tree is
renamed into place only when complete. This module also checks an archive's metadata (archives
are shared and not trusted) and opens it; ``wsi_idf.archive.reader`` reads its levels.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import CHANNELS, PATCH
from ..errors import ArchiveError, DamagedArchiveError
from ..outputs import is_unfinished_pack
from .reader import CheckedLevel, read_json, read_small_array
from ..storage.zarr_formats import FORMATS, detect
from .metadata import ArchiveMetadata

PREVIEW_MAX = 1024  # longest side of the preview's first level
PREVIEW_MIN = 256


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


def read_attributes(path: str | Path) -> tuple[dict, int]:
    """The root attributes of a finished archive (its metadata checked) and its Zarr format; refuses anything else."""
    metadata, attrs, fmt = read_metadata(path)
    return attrs, fmt


def read_metadata(path: str | Path) -> tuple[ArchiveMetadata, dict, int]:
    """The checked ``ArchiveMetadata`` of a finished archive, its root attributes and its Zarr format."""
    path = Path(path)
    if not path.exists():
        raise ArchiveError(f"{path}: no such archive")
    zarr_format = detect(path)
    if zarr_format is not None:
        attrs, fmt = zarr_format.attributes(read_json(path / zarr_format.root_file)), zarr_format.version
    else:
        partial = "; it looks like an unfinished pack (finish it with `wsi-idf pack --resume`)" \
            if path.name.endswith(".partial") or is_unfinished_pack(path) else ""
        raise ArchiveError(f"{path}: not a wsi-idf archive (no root metadata){partial}")
    return ArchiveMetadata.parse(attrs, fmt, path), attrs, fmt


def check_level_array(path: Path, level: int, lv: dict, model: dict, zarr_format: int,
                      archive: str | None = None) -> dict | None:
    """A level's own array metadata (what zarr reads) must be what the archive attributes describe:
    sizes come from the arrays, and the codec, its weights and the shard layout are wsi-idf's.
    Returns the model the level carries (its hash checked against the root's), or None."""
    fmt = FORMATS[zarr_format]
    folder = path / str(level)
    meta = read_json(folder / fmt.array_file)
    config = fmt.level_codec_config(meta)
    embedded = config.pop("embedded", None) if config is not None else None  # checked apart: root holds its hash
    if lv.get("storage", "idf") == "idf" and model.get("embedded"):
        if not isinstance(embedded, dict) or embedded.get("sha256") != model["embedded"]:
            raise DamagedArchiveError(f"{folder}: the level does not carry the archive's model "
                                      f"{model['embedded'][:16]}: the archive is damaged or forged")
    elif embedded is not None:
        raise DamagedArchiveError(f"{folder}: the level carries a model the archive does not name: damaged or forged")
    for key, value in fmt.expected_level_metadata(lv, model, archive).items():
        if meta.get(key) != value:
            raise DamagedArchiveError(f"{folder}: the level's array metadata ({key}) disagrees with the archive's "
                                      f"({str(meta.get(key))[:80]} vs {str(value)[:80]}): the archive is damaged or "
                                      "forged")
    return embedded


@dataclass
class Archive:
    """An open archive: levels as lazy (3, H, W) uint8 Dask arrays, and the archive metadata."""
    path: Path
    zarr_format: int
    levels: list  # dask arrays, level order of the source
    metadata: ArchiveMetadata  # the "wsi_idf" attributes: source, provenance, checksums, slide properties
    attributes: dict  # all root attributes (OME-NGFF included)
    readers: list  # one LevelReader per level

    @property
    def mpp(self) -> tuple[float, float] | None:
        mpp = self.metadata["slide"].get("mpp")
        return tuple(mpp) if mpp else None

    def region(self, level: int, x: int, y: int, width: int, height: int, flow_levels: int | None = None,
               *, levels: int | None = None) -> np.ndarray:
        """Pixels of one region of pyramid ``level`` as (height, width, 3) uint8; decodes only the
        patches it touches.

        ``flow_levels`` below the model's reads and decodes only the coarse flow levels of each patch:
        a progressive preview (``levels=`` is its older name). Missing, moved or damaged chunks raise
        (plain zarr would give zeros for a missing shard)."""
        from .reader import flow_levels_arg
        return self.reader(level).region(x, y, width, height, flow_levels_arg(flow_levels, levels))[0]

    def reader(self, level: int):
        """wsi-idf's checked reader of one level (``wsi_idf.archive.reader.LevelReader``)."""
        if not isinstance(level, int) or not 0 <= level < len(self.readers):
            raise ArchiveError(f"level {level} does not exist; the archive has levels 0..{len(self.readers) - 1}")
        return self.readers[level]

    def associated(self, name: str) -> np.ndarray:
        """An associated image (label, macro, thumbnail) as (h, w, 3) uint8, read with bounded memory."""
        if name not in self.metadata["associated"]:
            raise ArchiveError(f"{self.path}: no associated image {name!r}; it has {self.metadata['associated']}")
        return read_small_array(self.path / "associated" / name, self.zarr_format, self.metadata, f"associated/{name}")

    def preview(self, level: int = 0) -> np.ndarray:
        """A level of the zstd preview pyramid as (3, h, w) uint8, read with bounded memory."""
        levels = self.metadata.get("preview", {}).get("levels", 0)
        if not isinstance(level, int) or not 0 <= level < levels:
            raise ArchiveError(f"{self.path}: preview level {level} does not exist (it has {levels})")
        return read_small_array(self.path / "preview" / str(level), self.zarr_format, self.metadata, f"preview/{level}")

    def zarr_level(self, level: int):
        """The Zarr array of one level (what plain ``zarr.open_group(path)[str(level)]`` gives: no
        check that chunks exist, see README "Faults and damage")."""
        import zarr
        self.reader(level)
        return zarr.open_array(self.path / str(level), mode="r")


def archive_model(meta: ArchiveMetadata, carried: list[dict | None]):
    """The archive's coding model, from what its first IDF-coded level carries (``carried``: each level's,
    checked by ``check_level_array``) or, before format 4, the package's weights of that name; None when
    every level keeps its source tiles (no model is needed)."""
    from ..coding.embedded import configured_model
    from ..coding.policy import codec_device
    from ..errors import WsiIdfError
    if not meta.idf_levels:
        return None
    first, model = meta.idf_levels[0], meta["model"]
    try:
        return configured_model(model["name"], model["weights"], carried[first], str(codec_device()))
    except WsiIdfError as exc:
        if carried[first] is None:
            raise
        raise DamagedArchiveError(f"level {first}'s model: {exc}") from None  # it came with the archive


def open_archive(path: str | Path) -> Archive:
    """Open a finished archive read-only, after checking its metadata against its arrays. Each level
    is a Dask array read through wsi-idf's checked reader."""
    import dask.array as da
    from ..errors import WsiIdfError
    from .reader import LevelReader
    path = Path(path)
    meta, attrs, fmt = read_metadata(path)
    carried = [check_level_array(path, i, lv, meta["model"], fmt, meta.get("archive_id"))
               for i, lv in enumerate(meta["levels"])]
    try:
        coding_model = archive_model(meta, carried)
    except DamagedArchiveError as exc:
        raise DamagedArchiveError(f"{path}: {exc}") from None
    except WsiIdfError as exc:
        raise ArchiveError(f"{path}: cannot load the archive's model: {exc}") from None
    readers, levels = [], []
    for i, lv in enumerate(meta["levels"]):
        shard = lv["shard"] if FORMATS[fmt].sharded else PATCH  # v2: one file per chunk
        reader = LevelReader(path / str(i), i, lv["height"], lv["width"], shard, fmt, coding_model,
                             bound=meta["format_version"] >= 2, storage=lv.get("storage", "idf"),
                             chunk=lv.get("chunk", PATCH),
                             archive_id=bytes.fromhex(meta["archive_id"]) if meta.get("archive_id") else None,
                             source_codec=lv.get("source_codec"))
        readers.append(reader)
        levels.append(da.from_array(CheckedLevel(reader), chunks=(CHANNELS, lv["shard"], lv["shard"]),
                                    asarray=False, fancy=False, lock=False, meta=np.empty((0, 0, 0), np.uint8)))
    return Archive(path, fmt, levels, meta, attrs, readers)
