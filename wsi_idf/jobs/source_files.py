"""The source file(s) of a pack: size and time (must not change while packing), sha256, and the
restore data that gives them back (``archive.restore``), or why the archive cannot."""
from __future__ import annotations

from pathlib import Path

from ..digests import file_sha256
from ..errors import SlideError
from ..slide import Slide
from ..storage.shards import shard_boxes
from .shard_tasks import LevelLayout


def source_stat(files: list[Path]) -> dict:
    """Size (all files) and latest modification time of a source's files: what must not change while packing."""
    stats = [f.stat() for f in files]
    return {"size": sum(s.st_size for s in stats), "mtime_ns": max(s.st_mtime_ns for s in stats)}


def source_digests(slide: Slide) -> tuple[str, list[str]]:
    """The source's sha256 (a one-file source's own, or a folder's, ``digests.combined_digest``) and
    each file's: every file is read once, and the restore data reuses them."""
    from ..digests import combined_digest
    digests = [file_sha256(f) for f in slide.files]
    return (digests[0] if slide.files == [slide.path] else combined_digest(digests, slide.files)), digests


def check_unchanged(slide: Slide, recorded: dict) -> None:
    """Refuse a source that changed while it was packed (replaced, still being copied): the archive
    would mix two files and record a sha256 that matches neither."""
    now = source_stat(slide.files)
    if now != {k: recorded[k] for k in now}:
        raise SlideError(f"{slide.path.name} changed while it was packed (size {recorded['size']} -> {now['size']} "
                         "bytes, or its modification time); nothing was written: pack it again once it is complete")


MULTI_FILE_FORMATS = {".mrxs", ".vms", ".vmu"}  # OpenSlide formats whose pixels live in files beside the named one


def restore_obstacle(slide: Slide, layouts: list[LevelLayout], drop_label: bool) -> str | None:
    """Why the archive cannot give the source file back without ``--restorable`` (None: it can)."""
    if drop_label and "label" in slide.associated_names():
        return "its label was dropped (--drop-label), and a restored file would carry it"
    if slide.backend == "openslide" and slide.path.suffix.lower() in MULTI_FILE_FORMATS:
        return f"a {slide.path.suffix} slide keeps its pixels in other files beside it, which restore does not cover"
    coded = [str(i) for i, layout in enumerate(layouts) if layout.storage != "source"]
    if coded:
        return (f"level(s) {', '.join(coded)} are coded from their pixels, which cannot give the source's own "
                "bytes back; pack with --restorable to keep those bytes too")
    return None


def write_restore_data(root: Path, slide: Slide, source: Path, layouts: list[LevelLayout], records: dict[str, dict],
                       pieces: dict[str, list], digests: list[str], zarr_format: int, obstacle: str | None,
                       restorable: bool) -> dict:
    """``restore/`` (``archive.restore``) when the archive can give its source back, else why not."""
    from ..archive.restore import write_restore
    if obstacle is not None and (not restorable or not obstacle.startswith("level")):
        return {"restorable": False, "why": obstacle}
    pieces = dict(pieces)
    for i, (lv, layout) in enumerate(zip(slide.levels, layouts)):
        if layout.storage == "source":
            pieces[str(i)] = [p for box in shard_boxes(i, lv.height, lv.width, layout.shard)
                              for p in records[box.name]["pieces"]]
    keys = {name: int(name) if name.isdigit() else name.split("/", 1)[1] for name in pieces}
    offsets = {name: slide.segment_offsets(key) for name, key in keys.items()}
    file_of = {name: slide.segment_file(key) for name, key in keys.items()}
    return write_restore(root, slide.files, offsets, pieces, file_of, source.name, digests, zarr_format)
