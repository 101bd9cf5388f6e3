"""The archives a server shows: found under one folder, named by their folder, never outside it.

Names come from the archives' folder names (``slide.zarr`` -> ``slide``), made unique with the
parent folder's name where two collide. Requests only ever name an entry of this table: no path
from a URL reaches the file system, and a symlink that leads out of the served folder is not
followed, so nothing outside it is served.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ArchiveError
from ..storage.zarr_formats import is_archive

SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
MAX_DEPTH = 8


@dataclass
class Entry:
    """One archive in the catalog: its name, folder, and the facts the catalog page shows."""
    name: str
    path: Path
    summary: dict = field(default_factory=dict)
    error: str | None = None


def find_archives(root: Path) -> list[Path]:
    """Archives at or below ``root`` (recursively, not inside an archive, no link out of ``root``)."""
    root = root.resolve()
    if is_archive(root):
        return [root]
    found = []
    for folder, subfolders, _ in os.walk(root, followlinks=False):
        here = Path(folder)
        depth = len(here.relative_to(root).parts)
        keep = []
        for sub in sorted(subfolders):
            path = here / sub
            if sub.startswith(".") or depth >= MAX_DEPTH:
                continue
            if path.is_symlink():
                target = path.resolve()
                if not target.is_relative_to(root) or not is_archive(target):
                    continue
                found.append(path)
            elif is_archive(path):
                found.append(path)
            else:
                keep.append(sub)
        subfolders[:] = keep
    return sorted(found)


def unique_names(paths: list[Path], root: Path) -> dict[str, Path]:
    """``{stem}`` per archive; colliding stems get their parent folders' names (below ``root``) as a prefix."""
    root = root.resolve()

    def stem(path: Path, parents: int) -> str:
        folders = path.parent.relative_to(root).parts if path.parent.is_relative_to(root) else ()
        parts = [*folders[max(0, len(folders) - parents):], path.name.removesuffix(".zarr")]
        return SAFE_NAME.sub("_", "-".join(parts))
    names: dict[str, Path] = {}
    for path in paths:
        for parents in range(len(path.parts)):
            name = stem(path, parents)
            if name not in names and sum(stem(p, parents) == name for p in paths) == 1:
                break
        while name in names:
            name += "_"
        names[name] = path
    return names


def manifest_rows(path: Path) -> dict[str, dict]:
    """Rows of a batch manifest beside an archive (``manifest.json`` in its folder), by archive path."""
    manifest = path.parent / "manifest.json"
    try:
        rows = json.loads(manifest.read_text()) if manifest.is_file() else []
    except (OSError, ValueError):
        return {}
    return {str(Path(r["archive"]).resolve()): r for r in rows if isinstance(r, dict) and "archive" in r} \
        if isinstance(rows, list) else {}


def summarize(name: str, path: Path) -> Entry:
    """A catalog entry: what an archive holds, its sizes, how it is stored, the last verify result."""
    from ..archive.unpack import archive_info
    try:
        info = archive_info(path)  # opens and checks the archive once
    except ArchiveError as exc:
        return Entry(name, path, error=str(exc))
    row = manifest_rows(path).get(str(path.resolve()), {})
    level0 = info["levels"][0]
    storage = sorted({lv["storage"] + (f" ({lv['source_codec']})" if lv.get("source_codec") else "")
                      for lv in info["levels"]})
    summary = {"name": name, "width": level0["width"], "height": level0["height"], "levels": len(info["levels"]),
               "mpp": info["mpp"], "objective_power": info["objective_power"], "vendor": info["vendor"],
               "source": info["source"]["name"], "source_format": info["source"]["decoder"].get("compression"),
               "backend": info["source"].get("backend"), "archive_bytes": info["archive_bytes"],
               "source_bytes": info["source"]["size"], "ratio_to_source": info["ratio_to_source"],
               "ratio_to_raw": info["ratio_to_raw"], "storage": ", ".join(storage),
               "restorable": bool(info["restore"].get("restorable")),
               "verified": row.get("verified") or (row.get("status") if row else None),
               "associated": info["associated"], "model": info["model"]["name"]}
    return Entry(name, path, summary)


def load_catalog(root: Path) -> dict[str, Entry]:
    """Every archive under ``root`` by its unique name (an archive that does not open is listed with its error)."""
    if not root.exists():
        raise ArchiveError(f"{root}: no such archive or folder")
    return {name: summarize(name, path) for name, path in unique_names(find_archives(root), root).items()}
