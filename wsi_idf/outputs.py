"""What wsi-idf may replace: only outputs it wrote itself, never a source, never a user's file; and
how it writes: whole objects by rename (``write_atomic``), whose leftovers only it clears.

Every command that writes checks its output path here first. ``--overwrite`` replaces a
wsi-idf archive (recognized by its root metadata), an unfinished pack (by its plan file), or
an image file wsi-idf wrote (its Software tag or PNG text says so); anything else is refused
with one line, before anything is read, written or deleted.
"""
from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ArchiveError

SOFTWARE = "wsi-idf"  # the mark on TIFF and PNG files wsi-idf writes (TIFF Software tag, PNG text)
PLAN_FILE = ".wsi-idf-pack.json"  # the mark of an unfinished pack
TEMP_NAME = re.compile(r"^\..+\.\d+\.tmp$")  # write_atomic's temporary names: .{name}.{pid}.tmp


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


def check_output(out: Path, overwrite: bool, kind: str, sources: tuple[Path, ...] = (),
                 is_ours: Callable[[Path], bool] | None = None) -> None:
    """Refuse an output path that would destroy something wsi-idf did not write.

    ``kind`` is ``"archive"`` (a folder; ``is_ours`` tells a finished archive, e.g.
    ``storage.zarr_formats.is_archive``, which knows the Zarr formats) or ``"image"`` (a file).
    ``sources`` (the slide or archive being read) may never be replaced nor lie inside a replaced folder.
    """
    for source in sources:
        if source.exists() and (out.resolve() == source.resolve() or _inside(source, out)):
            raise ArchiveError(f"{out} is (or holds) the input {source}; choose another output")
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise ArchiveError(f"{out} already exists; pass --overwrite to replace it")
    if kind == "archive" and is_ours is None:
        raise ValueError("check_output needs is_ours to tell an archive")
    ours = is_ours(out) if kind == "archive" else out.is_file() and is_written_image(out)
    if out.is_symlink() or not ours:
        what = "a wsi-idf archive" if kind == "archive" else "a file written by wsi-idf"
        raise ArchiveError(f"{out} exists and is not {what}; --overwrite only replaces wsi-idf's own outputs, "
                           "so it was left untouched: choose another output or move it away yourself")


LOCK_MARK = b"wsi-idf output lock\n"


def lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.wsi-idf-lock")


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on an output (and so on its ``OUT.partial``) for a whole job.

    A second job writing the same output refuses at once instead of interleaving with the
    first (two ``--overwrite`` packs could otherwise leave a root without levels). The lock is
    a hidden file beside the output, removed when the job ends; a file of that name that is not
    a wsi-idf lock is refused, never touched.
    """
    path = lock_path(out)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise ArchiveError(f"cannot write the archive at {out}: cannot create its lock {path.name} "
                               f"({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ArchiveError(f"another wsi-idf job is writing {out} (it holds {path.name}); wait for it to end, "
                               "or choose another output") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed that file as we opened it: take the new one
    try:
        content = os.pread(fd, len(LOCK_MARK) + 1, 0)
        if content not in (b"", LOCK_MARK):
            os.close(fd)
            raise ArchiveError(f"{path} exists and is not a wsi-idf lock; it was left untouched: move it away")
        os.pwrite(fd, LOCK_MARK, 0)
    except OSError as exc:
        os.close(fd)
        raise ArchiveError(f"cannot write the archive at {out}: cannot lock it ({exc.strerror or exc})") from None
    try:
        yield
    finally:
        try:
            path.unlink()  # while still holding it: a waiting job then sees a fresh file
        except OSError:
            pass
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary name and rename: a crash leaves either nothing or the whole object
    (and, killed mid-write, a temporary file that ``remove_stale_temporaries`` clears on resume)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def remove_stale_temporaries(root: Path) -> int:
    """Delete ``write_atomic``'s temporary files under ``root`` (left by a killed writer); returns how
    many. Only for a folder wsi-idf wrote itself, with no writer running (an unfinished pack being resumed)."""
    stale = [p for p in root.rglob(".*.tmp") if p.is_file() and not p.is_symlink() and TEMP_NAME.match(p.name)]
    for p in stale:
        p.unlink()
    return len(stale)
