"""The archive's root metadata (the ``"wsi_idf"`` attributes): its one owner.

``ArchiveMetadata`` builds it (``pack``), validates it (every reader: archives are shared and not
trusted), serializes it, and derives what summaries report from it (sizes, ``source_lossy``, the
model's bytes and adaptation), so pack, info, verify, the batch job and the readers agree. It is a
read-only mapping of the JSON, so readers index it as they index the attributes.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from .._version import __version__
from ..config import PATCH
from ..errors import ArchiveError, DamagedArchiveError
from ..storage.zarr_formats import FORMATS

# Archive formats. 1: wsi-idf 0.1-0.2; 2: patches bound to their positions (patch format 3, wsi-idf
# 0.3-0.4); 3: wsi-idf 0.5: restore data, kept NDPI intervals and DICOM frames (older wsi-idf refuses it
# by name instead of calling new chunk kinds damage);
# 4: wsi-idf 0.6: IDF-coded levels carry their model's tensors in their codec configuration, and the
# model may be a lab's own or adapted to the slide (older wsi-idf would not find it by name)
ARCHIVE_FORMAT = 4
READABLE_FORMATS = (1, 2, 3, 4)
MAX_LEVEL_SIDE = 2**20  # pixels: beyond any scanner (~250k), and within what a patch position names
MAX_LEVELS = 32
NAME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")
MAX_SHARD_CHUNKS = 64  # a shard holds at most 64 x 64 chunks (IDF patches: 5120 px, a 235 MB raw shard)
MAX_SHARD = MAX_SHARD_CHUNKS * PATCH  # the largest shard pack writes for IDF levels


@dataclass(frozen=True)
class ArchiveMetadata(Mapping):
    """The root metadata of an archive, checked: build one with ``build``, read one with ``parse``."""

    data: dict

    @classmethod
    def build(cls, *, archive_id: str | None, checksums: dict, model: dict, source: dict, slide: dict,
              levels: list[dict], skipped_levels: list, associated: list[str], label_dropped: bool,
              preview_levels: int, restore: dict) -> ArchiveMetadata:
        """What ``pack`` writes, in the current archive format."""
        from .integrity import ALGORITHM
        return cls({"format_version": ARCHIVE_FORMAT, "wsi_idf_version": __version__, "archive_id": archive_id,
                    "checksums": {"algorithm": ALGORITHM, "arrays": checksums}, "model": model, "source": source,
                    "slide": slide, "levels": levels, "skipped_levels": skipped_levels, "associated": associated,
                    "label_dropped": label_dropped, "preview": {"path": "preview", "levels": preview_levels},
                    "restore": restore})

    @classmethod
    def parse(cls, attrs: dict, zarr_format: int, path: Path) -> ArchiveMetadata:
        """The checked metadata of an archive's root attributes (raises ``ArchiveError`` or, for damage,
        ``DamagedArchiveError``)."""
        meta = attrs.get("wsi_idf") if isinstance(attrs, dict) else None
        if not isinstance(meta, dict) or meta.get("format_version") not in READABLE_FORMATS:
            raise ArchiveError(f"{path}: not a wsi-idf archive (format versions "
                               f"{', '.join(map(str, READABLE_FORMATS))}), or written by a newer wsi-idf")
        check_metadata(attrs, zarr_format, path)
        return cls(meta)

    def to_json(self) -> dict:
        return copy.deepcopy(self.data)

    def __getitem__(self, key: str):
        return self.data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    @property
    def idf_levels(self) -> list[int]:
        return idf_levels(self.data)

    @property
    def source_lossy(self) -> bool:
        return source_lossy(self.data)

    def sizes(self, path: Path) -> dict:
        return archive_sizes(path, self.data)

    def model_facts(self) -> dict:
        return model_facts(self.data)

    def restore_info(self) -> dict:
        return restore_info(self.data)


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
        shard = _int(path, f"{where} shard", lv.get("shard"), chunk, MAX_SHARD_CHUNKS * max(chunk, PATCH))
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


def idf_levels(meta: dict) -> list[int]:
    """The levels coded with the IDF (the others keep their source tiles and need no model)."""
    return [i for i, lv in enumerate(meta["levels"]) if lv.get("storage", "idf") == "idf"]


def model_facts(meta: dict) -> dict:
    """The bytes of the model weights the archive carries, and what adapting the model measured
    (checked: the metadata may be hostile, and these are printed)."""
    model, idf_count = meta["model"], len(idf_levels(meta))
    size = model.get("embedded_bytes")
    adaptation = model.get("adaptation")
    numbers = ("steps", "seconds", "heldout_patches", "base_bpsp", "adapted_bpsp")
    if not (isinstance(adaptation, dict) and (isinstance(adaptation.get("skipped"), str) and
                                              adaptation.get("kept") == "base" or
                                              adaptation.get("kept") in ("adapted", "base") and
                                              all(isinstance(adaptation.get(k), (int, float)) and
                                                  not isinstance(adaptation.get(k), bool) for k in numbers)
                                              and adaptation["base_bpsp"] > 0)):
        adaptation = None
    return {"model_bytes": size * idf_count if isinstance(size, int) and not isinstance(size, bool) and size > 0 else 0,
            "adaptation": adaptation}


def restore_info(meta: dict) -> dict:
    """Whether an archive gives its source back, and why not (from the root metadata)."""
    info = meta.get("restore")
    if not isinstance(info, dict):
        return {"restorable": False, "why": "written before wsi-idf 0.5 (no restore data)"}
    return info
