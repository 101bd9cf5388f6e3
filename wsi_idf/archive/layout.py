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

# 3: wsi-idf 0.5: restore data, kept NDPI intervals and DICOM frames (older wsi-idf refuses it by
# name instead of calling new chunk kinds damage); 2: patches bound to their positions (patch format 3,
# wsi-idf 0.3-0.4); 1: wsi-idf 0.1-0.2
# 4: wsi-idf 0.6: IDF-coded levels carry their model's tensors in their codec configuration, and the
# model may be a lab's own or adapted to the slide (older wsi-idf would not find it by name)
ARCHIVE_FORMAT = 4
READABLE_FORMATS = (1, 2, 3, 4)
PREVIEW_MAX = 1024  # longest side of the preview's first level
PREVIEW_MIN = 256
MAX_LEVEL_SIDE = 2**20  # pixels: beyond any scanner (~250k), and within what a patch position names
MAX_LEVELS = 32
NAME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


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
    """The root attributes of a finished archive and its Zarr format; refuses anything else."""
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
    meta = attrs.get("wsi_idf") if isinstance(attrs, dict) else None
    if not isinstance(meta, dict) or meta.get("format_version") not in READABLE_FORMATS:
        raise ArchiveError(f"{path}: not a wsi-idf archive (format versions {', '.join(map(str, READABLE_FORMATS))}), "
                           f"or written by a newer wsi-idf")
    check_metadata(attrs, fmt, path)
    return attrs, fmt


def _damaged(path: Path, where: str, problem: str) -> ArchiveError:
    return DamagedArchiveError(f"{path}: the archive metadata is damaged or forged: {where} {problem}")


def _int(path: Path, where: str, value: object, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise _damaged(path, where, f"must be a whole number from {lo} to {hi}, not {str(value)[:40]!r}")
    return value


def _number(path: Path, where: str, value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1e9:
        raise _damaged(path, where, f"must be a positive number, not {str(value)[:40]!r}")
    return float(value)


def _hex(path: Path, where: str, value: object, digits: int) -> str:
    if not isinstance(value, str) or len(value) != digits or not set(value) <= set("0123456789abcdef"):
        raise _damaged(path, where, f"must be {digits} hex digits, not {str(value)[:40]!r}")
    return value


def _dict(path: Path, where: str, value: object) -> dict:
    if not isinstance(value, dict):
        raise _damaged(path, where, f"must be an object, not {type(value).__name__}")
    return value


def _name(path: Path, where: str, value: object) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 64 or not set(value) <= NAME_CHARACTERS \
            or value.startswith("."):
        raise _damaged(path, where, f"must be a plain name, not {str(value)[:40]!r}")
    return value


def check_metadata(attrs: dict, zarr_format: int, path: Path) -> None:
    """Every field wsi-idf's readers use has its type and range, and every level lives where
    the OME-NGFF multiscales say: readers and viewers follow those paths, so they must be the
    canonical ``"0"``, ``"1"``... that verify checks. Archives are shared: nothing here is trusted."""
    from ..coding.registry import check_model_name
    from ..errors import WsiIdfError
    meta = _dict(path, "wsi_idf", attrs.get("wsi_idf"))
    model = _dict(path, "model", meta.get("model"))
    try:
        check_model_name(model.get("name"))
    except WsiIdfError as exc:
        raise _damaged(path, "model name", f"is not a model name ({exc})") from None
    _hex(path, "model weights", model.get("weights"), 64)
    if "embedded" in model:
        _hex(path, "model embedded", model.get("embedded"), 64)
    levels = meta.get("levels")
    if not isinstance(levels, list) or not 1 <= len(levels) <= MAX_LEVELS:
        raise _damaged(path, "levels", f"must be a list of 1 to {MAX_LEVELS} levels")
    for i, lv in enumerate(levels):
        where = f"level {i}"
        lv = _dict(path, where, lv)
        if lv.get("path") != str(i):
            raise _damaged(path, f"{where} path", f"must be {str(i)!r}, not {str(lv.get('path'))[:40]!r}")
        _int(path, f"{where} width", lv.get("width"), 1, MAX_LEVEL_SIDE)
        _int(path, f"{where} height", lv.get("height"), 1, MAX_LEVEL_SIDE)
        storage = lv.get("storage", "idf")
        if storage not in ("idf", "source"):
            raise _damaged(path, f"{where} storage", f"must be idf or source, not {str(storage)[:40]!r}")
        chunk = PATCH if storage == "idf" else _int(path, f"{where} chunk", lv.get("chunk"), 16, 4096)
        if lv.get("chunk", PATCH) != chunk or storage == "source" and not FORMATS[zarr_format].keeps_source_tiles:
            raise _damaged(path, f"{where} chunk", f"must be {chunk} for {storage} storage in Zarr v{zarr_format}")
        if lv.get("source_codec") not in ((None,) if storage == "idf" else ("jpeg", "jpeg2000")):
            raise _damaged(path, f"{where} source_codec", f"does not fit {storage} storage")
        shard = _int(path, f"{where} shard", lv.get("shard"), chunk, 64 * max(chunk, PATCH))
        if shard % chunk:
            raise _damaged(path, f"{where} shard", f"must be a multiple of {chunk}, not {shard}")
        _number(path, f"{where} downsample", lv.get("downsample"))
        _int(path, f"{where} encoded_bytes", lv.get("encoded_bytes"), 0, 2**62)
        _hex(path, f"{where} checksum", _dict(path, f"{where} checksum", lv.get("checksum")).get("value"), 64)
    multiscales = _dict(path, "ome", FORMATS[zarr_format].ome(attrs)).get("multiscales")
    if not isinstance(multiscales, list) or not multiscales or not isinstance(multiscales[0], dict):
        raise _damaged(path, "OME-NGFF multiscales", "are missing")
    datasets = multiscales[0].get("datasets")
    paths = [d.get("path") if isinstance(d, dict) else None for d in datasets] if isinstance(datasets, list) else None
    if paths != [str(i) for i in range(len(levels))]:
        raise _damaged(path, "OME-NGFF dataset paths", f"must be the levels {[str(i) for i in range(len(levels))]}, "
                       f"not {str(paths)[:80]}: viewers would show other pixels than wsi-idf verifies")
    associated = meta.get("associated")
    if not isinstance(associated, list):
        raise _damaged(path, "associated", "must be a list of names")
    for name in associated:
        _name(path, "associated image name", name)
    preview = _dict(path, "preview", meta.get("preview", {"levels": 0}))
    _int(path, "preview levels", preview.get("levels", 0), 0, MAX_LEVELS)
    if not isinstance(meta.get("wsi_idf_version"), str) or not isinstance(meta.get("skipped_levels"), list) \
            or not isinstance(meta.get("label_dropped"), bool):
        raise _damaged(path, "wsi_idf_version, skipped_levels or label_dropped", "is missing or of the wrong type")
    for skipped in meta["skipped_levels"]:
        skipped = _dict(path, "skipped level", skipped)
        for key in ("level", "width", "height"):
            _int(path, f"skipped level {key}", skipped.get(key), 0, 2**40)
        if not isinstance(skipped.get("reason"), str):
            raise _damaged(path, "skipped level reason", "must be text")
    slide = _dict(path, "slide", meta.get("slide"))
    for key, types in (("mpp", (list, type(None))), ("objective_power", (int, float, type(None))),
                       ("vendor", (str, type(None))), ("properties", dict), ("icc_profile", (str, type(None)))):
        if key not in slide or not isinstance(slide[key], types) or isinstance(slide[key], bool):
            raise _damaged(path, f"slide {key}", "is missing or of the wrong type")
    if slide["icc_profile"] is not None:
        import base64
        import binascii
        try:
            base64.b64decode(slide["icc_profile"], validate=True)
        except (binascii.Error, ValueError):
            raise _damaged(path, "slide icc_profile", "is not base64") from None
    mpp = slide.get("mpp")
    if mpp is not None and (not isinstance(mpp, list) or len(mpp) != 2):
        raise _damaged(path, "slide mpp", "must be two numbers or null")
    for value in mpp or ():
        _number(path, "slide mpp", value)
    source = _dict(path, "source", meta.get("source"))
    if not isinstance(source.get("name"), str):
        raise _damaged(path, "source name", "must be text")
    _int(path, "source size", source.get("size"), 0, 2**62)
    _hex(path, "source sha256", source.get("sha256"), 64)
    _dict(path, "source decoder", source.get("decoder"))
    if meta.get("archive_id") is not None or meta.get("checksums") is not None:  # archives of wsi-idf 0.5 on
        _hex(path, "archive_id", meta.get("archive_id"), 32)
        _dict(path, "checksums arrays", _dict(path, "checksums", meta.get("checksums")).get("arrays"))
    restore = meta.get("restore")
    if restore is not None and not isinstance(_dict(path, "restore", restore).get("restorable"), bool):
        raise _damaged(path, "restore restorable", "must be true or false")


LOSSY_VENDORS = frozenset({"aperio", "hamamatsu", "mirax", "leica", "philips", "ventana"})  # via OpenSlide


def source_lossy(meta: dict) -> bool:
    """Whether the source was stored lossily (its pixels are a lossy file's decode), from the archive
    metadata alone: the one definition that pack, info and the catalog share."""
    from ..slide import LOSSY_COMPRESSIONS
    source = meta["source"]
    return (source["decoder"].get("compression", "") in LOSSY_COMPRESSIONS
            or source.get("backend") == "openslide" and meta["slide"].get("vendor") in LOSSY_VENDORS)


def tree_size(path: Path) -> int:
    """Bytes of every file under a folder: what an archive costs on disk."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def archive_sizes(path: Path, meta: dict) -> dict:
    """The sizes and ratios every summary reports (pack, info, the batch manifest), from one place."""
    raw = sum(lv["width"] * lv["height"] * 3 for lv in meta["levels"])
    coded = sum(lv["encoded_bytes"] for lv in meta["levels"])
    size = tree_size(path)
    source = meta["source"]["size"]
    return {"raw_bytes": raw, "archive_bytes": size, "source_bytes": source, "ratio_to_raw": round(raw / size, 3),
            "ratio_to_source": round(source / size, 3), "bits_per_subpixel": round(8 * coded / raw, 4)}


def check_level_array(path: Path, level: int, lv: dict, model: dict, zarr_format: int,
                      archive: str | None = None) -> None:
    """A level's own array metadata (what zarr reads) must be what the archive attributes describe:
    sizes come from the arrays, and the codec, its weights and the shard layout are wsi-idf's."""
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


@dataclass
class Archive:
    """An open archive: levels as lazy (3, H, W) uint8 Dask arrays, and the archive metadata."""
    path: Path
    zarr_format: int
    levels: list  # dask arrays, level order of the source
    metadata: dict  # the "wsi_idf" attributes: source, provenance, checksums, slide properties
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


def archive_model(path: Path, meta: dict, zarr_format: int):
    """The archive's coding model: the tensors its IDF-coded levels carry (format 4), else the package's
    weights of that name; None when every level keeps its source tiles (no model is needed)."""
    from ..coding.embedded import load_embedded
    from ..coding.policy import codec_device
    from ..errors import WsiIdfError
    from ..coding.registry import get_model
    model = meta["model"]
    idf_levels = [i for i, lv in enumerate(meta["levels"]) if lv.get("storage", "idf") == "idf"]
    if not idf_levels:
        return None
    if not model.get("embedded"):
        return get_model(model["name"], weights=model["weights"])
    fmt = FORMATS[zarr_format]
    config = fmt.level_codec_config(read_json(path / str(idf_levels[0]) / fmt.array_file)) or {}
    payload = config.get("embedded")
    if not isinstance(payload, dict) or payload.get("sha256") != model["embedded"]:
        raise DamagedArchiveError(f"{path}: level {idf_levels[0]} does not carry the archive's model: the archive "
                                  "is damaged or forged")
    try:
        return load_embedded(payload, model["weights"], str(codec_device()))
    except WsiIdfError as exc:  # the bytes came with the archive: their damage is the archive's
        raise DamagedArchiveError(f"{path}: level {idf_levels[0]}'s model: {exc}") from None


def open_archive(path: str | Path) -> Archive:
    """Open a finished archive read-only, after checking its metadata against its arrays. Each level
    is a Dask array read through wsi-idf's checked reader."""
    import dask.array as da
    from ..errors import WsiIdfError
    from .reader import LevelReader
    path = Path(path)
    attrs, fmt = read_attributes(path)
    meta = attrs["wsi_idf"]
    model = meta["model"]
    try:
        coding_model = archive_model(path, meta, fmt)
    except DamagedArchiveError:
        raise
    except WsiIdfError as exc:
        raise ArchiveError(f"{path}: cannot load the archive's model: {exc}") from None
    readers, levels = [], []
    for i, lv in enumerate(meta["levels"]):
        check_level_array(path, i, lv, model, fmt, meta.get("archive_id"))
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
