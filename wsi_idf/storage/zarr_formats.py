"""The two Zarr formats an archive can be written in, each an object that owns its paths and metadata.

Zarr v3 (the default) holds OME-NGFF 0.5 and shards; Zarr v2 holds OME-NGFF 0.4 and one file per
80x80 chunk. Everything that differs between them lives here (as ome-zarr-py's ``FormatV04`` and
``FormatV05`` do), so the writers and readers ask the format instead of branching on a number.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..config import CHANNELS, PATCH
from ..outputs import write_atomic

STANDARD_CHUNK = 512
ZSTD_LEVEL = 19
OMERO = {"rdefs": {"model": "color"}, "channels": [
    {"label": label, "color": color, "active": True, "window": {"start": 0, "end": 255, "min": 0, "max": 255}}
    for label, color in (("R", "FF0000"), ("G", "00FF00"), ("B", "0000FF"))]}
V3_KEYS = {"name": "default", "configuration": {"separator": "/"}}




@dataclass(frozen=True)
class ZarrFormat:
    version: int
    ome_version: str
    root_file: str  # the file holding a group's attributes
    array_file: str  # the file holding an array's metadata
    sharded: bool  # chunks grouped in shard files (v3) or one file each (v2)

    @property
    def keeps_source_tiles(self) -> bool:
        """Whether levels may keep the source's own tiles (their chunks are not 80x80: v3 only)."""
        return self.sharded

    def standard_chunks(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(min(s, STANDARD_CHUNK) if s > CHANNELS or len(shape) - i <= 2 else s
                     for i, s in enumerate(shape))

    def chunk_file(self, root: Path, level: int, row: int, col: int) -> Path:
        """The file holding shard (row, col) of ``level`` (v3), or chunk (row, col) (v2)."""
        return root / str(level) / ("c/0" if self.sharded else "0") / str(row) / str(col)

    def chunk_files_folder(self, level_folder: Path) -> Path:
        """The folder whose grandchildren are a level's chunk (or shard) files."""
        return level_folder / ("c/0" if self.sharded else "0")

    def small_chunk_file(self, folder: Path, coords: tuple[int, ...]) -> Path:
        """The file of one chunk of a preview or associated array (default keys, "/" separator)."""
        key = "/".join(map(str, coords))
        return folder / (f"c/{key}" if self.version == 3 else key)

    def image_attributes(self, multiscale: dict, extra: dict | None = None) -> dict:
        """OME-NGFF attributes: 0.5 under ``ome`` for Zarr v3, 0.4 at the top level for v2."""
        if self.version == 3:
            attrs = {"ome": {"version": "0.5", "multiscales": [multiscale], "omero": OMERO}}
        else:
            attrs = {"multiscales": [dict(multiscale, version="0.4")], "omero": dict(OMERO, version="0.4")}
        return {**attrs, **(extra or {})}

    def ome(self, attrs: dict) -> object:
        """The part of the root attributes that holds the OME-NGFF multiscales."""
        return attrs.get("ome", {}) if self.version == 3 else attrs

    def write_group(self, path: Path, attributes: dict) -> None:
        """A group's metadata, written directly: creating it through zarr could disturb existing children."""
        if self.version == 3:
            write_atomic(path / "zarr.json", json.dumps(
                {"zarr_format": 3, "node_type": "group", "attributes": attributes}, indent=2).encode())
        else:
            write_atomic(path / ".zattrs", json.dumps(attributes, indent=2).encode())
            write_atomic(path / ".zgroup", json.dumps({"zarr_format": 2}).encode())

    def attributes(self, root_metadata: dict) -> object:
        """A group's attributes from its metadata file."""
        return root_metadata.get("attributes", {}) if self.version == 3 else root_metadata

    def level_array_kwargs(self, height: int, width: int, shard: int, model: str, weights: str | None,
                           chunk: int = PATCH, archive: str | None = None, embedded: dict | None = None) -> dict:
        """zarr.create_array arguments for one coded level (``chunk``: 80 for IDF patches, the tile side
        for a level that keeps its source tiles; ``archive``: the archive's id, which its chunks' checksums cover)."""
        common = dict(shape=(CHANNELS, height, width), dtype="uint8", chunks=(CHANNELS, chunk, chunk), fill_value=0,
                      zarr_format=self.version, overwrite=True)
        if self.version == 3:
            from .zarr_codec import WsiIdfCodec
            return dict(common, shards=(CHANNELS, shard, shard),
                        serializer=WsiIdfCodec(model=model, weights=weights, archive=archive, embedded=embedded),
                        compressors=None, dimension_names=("c", "y", "x"))
        from .numcodecs_codec import WsiIdf
        return dict(common, compressors=WsiIdf(model=model, weights=weights, archive=archive, embedded=embedded), filters=None,
                    chunk_key_encoding={"name": "v2", "separator": "/"})

    def standard_array_kwargs(self, shape: tuple[int, ...], dimension_names: tuple[str, ...]) -> dict:
        """zarr.create_array arguments for preview and associated images: zstd, readable everywhere."""
        common = dict(shape=shape, dtype="uint8", chunks=self.standard_chunks(shape), fill_value=0,
                      zarr_format=self.version, overwrite=True)
        if self.version == 3:
            from zarr.codecs import ZstdCodec
            return dict(common, compressors=ZstdCodec(level=ZSTD_LEVEL), dimension_names=dimension_names)
        from numcodecs import Zstd
        return dict(common, compressors=Zstd(level=ZSTD_LEVEL), chunk_key_encoding={"name": "v2", "separator": "/"})

    def expected_level_metadata(self, lv: dict, model: dict, archive: str | None = None) -> dict:
        """The fields of a coded level's array metadata that must be exactly what wsi-idf writes."""
        chunk = lv.get("chunk", PATCH)
        shape = [CHANNELS, lv["height"], lv["width"]]
        codec = {"model": model["name"], "weights": model["weights"], **({"archive": archive} if archive else {})}
        if self.version == 3:
            return {
                "node_type": "array", "shape": shape, "data_type": "uint8", "fill_value": 0,
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [CHANNELS, lv["shard"], lv["shard"]]}},
                "chunk_key_encoding": V3_KEYS,
                "codecs": [{"name": "sharding_indexed", "configuration": {
                    "chunk_shape": [CHANNELS, chunk, chunk], "codecs": [{"name": "wsi_idf", "configuration": codec}],
                    "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
                    "index_location": "end"}}]}
        return {"shape": shape, "chunks": [CHANNELS, PATCH, PATCH], "dtype": "|u1", "fill_value": 0, "order": "C",
                "filters": None, "dimension_separator": "/", "compressor": {"id": "wsi_idf", **codec}}

    def level_codec_config(self, meta: dict) -> dict | None:
        """The ``wsi_idf`` codec configuration inside a level's array metadata (None: not where wsi-idf puts it)."""
        try:
            if self.version == 3:
                config = meta["codecs"][0]["configuration"]["codecs"][0]["configuration"]
            else:
                config = meta["compressor"]
        except (KeyError, IndexError, TypeError):
            return None
        return config if isinstance(config, dict) else None

    def small_array_layout(self, meta: dict) -> tuple[object, object, bool] | None:
        """(shape, chunks, kept by the wsi_idf codec) of a preview or associated array's metadata, or
        None when it is not a uint8 array in zstd (or, v3, the wsi_idf codec) as wsi-idf writes them."""
        if self.version == 3:
            grid = meta.get("chunk_grid")
            config = grid.get("configuration") if isinstance(grid, dict) else None
            chunks = config.get("chunk_shape") if isinstance(config, dict) else None
            codecs = meta.get("codecs")
            names = [c.get("name") if isinstance(c, dict) else None for c in codecs] \
                if isinstance(codecs, list) else None
            ok = (meta.get("node_type") == "array" and meta.get("data_type") == "uint8"
                  and meta.get("chunk_key_encoding") == V3_KEYS and names in (["bytes", "zstd"], ["wsi_idf"]))
            return (meta.get("shape"), chunks, names == ["wsi_idf"]) if ok else None
        compressor = meta.get("compressor")
        ok = (meta.get("dtype") == "|u1" and meta.get("filters") is None and meta.get("order") == "C"
              and meta.get("dimension_separator") == "/" and isinstance(compressor, dict)
              and compressor.get("id") == "zstd")
        return (meta.get("shape"), meta.get("chunks"), False) if ok else None


V2 = ZarrFormat(2, "0.4", ".zattrs", ".zarray", sharded=False)
V3 = ZarrFormat(3, "0.5", "zarr.json", "zarr.json", sharded=True)
FORMATS = {2: V2, 3: V3}


def is_archive(path: Path) -> bool:
    """A finished wsi-idf archive: a Zarr v3 or v2 group whose attributes hold wsi-idf's (what
    ``--overwrite`` may replace, and what the catalog lists)."""
    fmt = detect(path)
    try:
        attrs = fmt.attributes(json.loads((path / fmt.root_file).read_text())) if fmt else None
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(attrs, dict) and isinstance(attrs.get("wsi_idf"), dict)


def detect(path: Path) -> ZarrFormat | None:
    """The format of a group by its metadata file (None: neither)."""
    for fmt in (V3, V2):
        if (path / fmt.root_file).is_file():
            return fmt
    return None
