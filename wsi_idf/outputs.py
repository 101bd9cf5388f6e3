"""What wsi-idf may replace: only outputs it wrote itself, never a source, never a user's file.

Every command that writes checks its output path here first. ``--overwrite`` replaces a
wsi-idf archive (recognized by its root metadata), an unfinished pack (by its plan file), or
an image file wsi-idf wrote (its Software tag or PNG text says so); anything else is refused
with one line, before anything is read, written or deleted.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import ArchiveError

SOFTWARE = "wsi-idf"  # the mark on TIFF and PNG files wsi-idf writes (TIFF Software tag, PNG text)
PLAN_FILE = ".wsi-idf-pack.json"  # the mark of an unfinished pack


def is_archive(path: Path) -> bool:
    """A finished wsi-idf archive (Zarr v3 or v2 root with wsi-idf attributes)."""
    try:
        if (path / "zarr.json").is_file():
            attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
        elif (path / ".zattrs").is_file():
            attrs = json.loads((path / ".zattrs").read_text())
        else:
            return False
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(attrs, dict) and isinstance(attrs.get("wsi_idf"), dict)


def is_unfinished_pack(path: Path) -> bool:
    return path.is_dir() and (path / PLAN_FILE).is_file()


def is_written_image(path: Path) -> bool:
    """A PNG or TIFF file that wsi-idf wrote (``region``, ``unpack``)."""
    try:
        from PIL import Image
        with Image.open(path) as im:
            if im.format == "PNG":
                return im.text.get("Software", "").startswith(SOFTWARE)
        import tifffile
        with tifffile.TiffFile(path) as tif:
            software = tif.pages[0].tags.get("Software")
            return software is not None and str(software.value).startswith(SOFTWARE)
    except Exception:  # not an image at all: not ours
        return False


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def check_output(out: Path, overwrite: bool, kind: str, sources: tuple[Path, ...] = ()) -> None:
    """Refuse an output path that would destroy something wsi-idf did not write.

    ``kind`` is ``"archive"`` (a folder) or ``"image"`` (a file). ``sources`` (the slide or
    archive being read) may never be replaced nor lie inside a replaced folder.
    """
    for source in sources:
        if source.exists() and (out.resolve() == source.resolve() or _inside(source, out)):
            raise ArchiveError(f"{out} is (or holds) the input {source}; choose another output")
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise ArchiveError(f"{out} already exists; pass --overwrite to replace it")
    ours = is_archive(out) if kind == "archive" else out.is_file() and is_written_image(out)
    if out.is_symlink() or not ours:
        what = "a wsi-idf archive" if kind == "archive" else "a file written by wsi-idf"
        raise ArchiveError(f"{out} exists and is not {what}; --overwrite only replaces wsi-idf's own outputs, "
                           "so it was left untouched: choose another output or move it away yourself")
