"""The source file back, byte for byte, from an archive (``wsi-idf restore``).

A kept tile's bytes are in its chunk already (``source_tiles.Piece``). What is not pixel data
(TIFF headers, IFDs, JPEG tables, vendor tags, images that were coded from pixels) is stored
once, as each source file's **skeleton**: the file with every kept segment's byte range cut out,
in zstd. Beside it a table gives each kept segment's place in the file and in its chunk::

    slide.zarr/restore/
      zarr.json       attributes: the source's name and sha256, and per file its name, size and
                      sha256, the arrays its table names, the prefixes and suffixes its pieces use
                      (hex), and how strips made again from pixels were made (``storage.tiff_strips``)
      0/skeleton      (n,) uint8, zstd: the file's bytes outside its kept segments, in file order
      0/segments      (count, 9) int64, zstd: file offset, length, array, chunk row, chunk column,
                      start and stop in the chunk's stream, prefix and suffix (indices)
      1/ ...          the next file of a multi-file source (a DICOM series folder)

Restoring walks each table in file order, writing skeleton bytes up to each segment and the
segment rebuilt from its chunk; each file must have its recorded sha256 before it is renamed
into place (a folder source: each file in a new folder, renamed into place last). A level coded
from its pixels (a lossless source's deflate or LZW tiles) cannot give its bytes back: then the
archive is restorable only if ``pack --restorable`` kept them in the skeleton.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..errors import ArchiveError, DamagedArchiveError
from ..storage.zarr_formats import FORMATS

RESTORE_GROUP = "restore"
RESTORE_FORMAT = 1
COLUMNS = ("offset", "length", "array", "row", "col", "start", "stop", "prefix", "suffix")
SKELETON_CHUNK = 1 << 22  # 4 MiB of skeleton per zarr chunk
COPY_BLOCK = 1 << 24
MAX_FILES = 4096


class RestoreMismatchError(ArchiveError):
    """The restored bytes do not have the sha256 recorded at pack time (exit code 3)."""


def write_restore(root: Path, files: list[Path], offsets: dict[str, tuple[np.ndarray, np.ndarray]],
                  pieces: dict[str, list], file_of: dict[str, int], name: str, digests: list[str],
                  zarr_format: int) -> dict:
    """Write ``restore/`` for the source ``files`` (whose sha256s, ``digests``, pack computed as it
    read them): ``pieces`` per array path (``pack.piece_record`` lists), the file each array's
    segments live in (``file_of``) and their ``offsets`` (offsets, byte counts) there. Returns the
    summary recorded in the root metadata."""
    from ..digests import combined_digest
    from .metadata import tree_size
    fmt = FORMATS[zarr_format]
    folder = root / RESTORE_GROUP
    entries, skeleton_bytes, count = [], 0, 0
    for k, path in enumerate(files):
        arrays = sorted(a for a in pieces if file_of[a] == k)
        entry, table = file_entry(path, arrays, offsets, pieces)
        skeleton_sha256, length = write_skeleton(folder / str(k) / "skeleton", path, table, fmt)
        entry.update(sha256=digests[k], skeleton_sha256=skeleton_sha256,
                     segments_sha256=hashlib.sha256(table.tobytes()).hexdigest())
        entries.append(entry)
        _write_array(folder / str(k) / "segments", table, (1 << 16, len(COLUMNS)), fmt)
        skeleton_bytes, count = skeleton_bytes + length, count + len(table)
    sha256 = digests[0] if len(files) == 1 and files[0].name == name else combined_digest(digests, files)
    fmt.write_group(folder, {"wsi_idf_restore": {"format_version": RESTORE_FORMAT, "name": name, "sha256": sha256,
                                                 "folder": len(files) > 1 or files[0].name != name,
                                                 "columns": list(COLUMNS), "files": entries}})
    return {"restorable": True, "skeleton_bytes": skeleton_bytes, "segments": count,
            "stored_bytes": tree_size(folder)}


def file_entry(path: Path, arrays: list[str], offsets: dict, pieces: dict) -> tuple[dict, np.ndarray]:
    """One source file's restore entry and its segment table (file order)."""
    affixes: dict[str, int] = {"": 0}
    rows, recipes = [], {}
    for a, array in enumerate(arrays):
        starts, counts = offsets[array]
        for segment, r, c, start, stop, prefix, suffix, *recipe in pieces[array]:
            if recipe:  # strips made again from the pixels (``storage.tiff_strips``)
                recipes[array] = recipe[0]
            rows.append((int(starts[segment]), int(counts[segment]), a, r, c, start, stop,
                         affixes.setdefault(prefix, len(affixes)), affixes.setdefault(suffix, len(affixes))))
    table = np.array(sorted(rows), dtype=np.int64).reshape(-1, len(COLUMNS))
    size = path.stat().st_size
    ends = table[:, 0] + table[:, 1]
    if len(table) and (np.any(table[1:, 0] < ends[:-1]) or int(ends.max()) > size or np.any(table[:, 1] <= 0)):
        raise ArchiveError(f"{path.name}: its kept segments overlap or leave the file: it cannot be restored")
    entry = {"name": path.name, "size": size, "arrays": arrays, "affixes": list(affixes), "regenerated": recipes}
    return entry, table


def write_skeleton(target: Path, path: Path, table: np.ndarray, fmt) -> tuple[str, int]:
    """The file's bytes outside its kept segments, streamed into a zstd array a chunk at a time (a
    lossless slide packed ``--restorable`` can be gigabytes); their sha256 and length."""
    import zarr
    length = path.stat().st_size - int(table[:, 1].sum())
    kwargs = fmt.standard_array_kwargs((length,), ("i",))
    kwargs.update(chunks=(min(SKELETON_CHUNK, max(1, length)),))
    if fmt.version == 3:
        kwargs["dimension_names"] = None
    arr = zarr.create_array(store=str(target), **kwargs)
    digest, buffer, written = hashlib.sha256(), bytearray(), 0

    def flush(final: bool) -> None:
        nonlocal written
        while len(buffer) >= SKELETON_CHUNK or final and buffer:
            block = bytes(buffer[:SKELETON_CHUNK])
            arr[written:written + len(block)] = np.frombuffer(block, np.uint8)
            digest.update(block)
            written += len(block)
            del buffer[:len(block)]

    with open(path, "rb") as f:
        at = 0
        for offset, size in [*table[:, :2].tolist(), (path.stat().st_size, 0)]:
            f.seek(at)
            remaining = offset - at
            while remaining:
                block = f.read(min(remaining, COPY_BLOCK))
                if not block:
                    raise ArchiveError(f"{path.name}: changed while it was packed: the restore data cannot be made")
                buffer += block
                remaining -= len(block)
                flush(False)
            at = offset + size
    flush(True)
    if written != length:
        raise ArchiveError(f"{path.name}: changed while it was packed: the restore data cannot be made")
    return digest.hexdigest(), length


def _write_array(path: Path, data: np.ndarray, chunks: tuple[int, ...], fmt) -> None:
    import zarr
    kwargs = fmt.standard_array_kwargs(data.shape, ("i",) if data.ndim == 1 else ("i", "j"))
    kwargs.update(dtype=data.dtype, chunks=tuple(min(c, max(1, s)) for c, s in zip(chunks, data.shape)))
    if fmt.version == 3:
        kwargs["dimension_names"] = None
    arr = zarr.create_array(store=str(path), **kwargs)
    if data.size:
        arr[...] = data


def restore_file(archive_path: str | Path, out: str | Path, overwrite: bool = False, progress: bool = False) -> dict:
    """Write the archive's source file (or folder, for a multi-file source) to ``out``, byte for byte,
    each file checked against its sha256.

    ``out`` may exist only with ``overwrite`` and only when it already holds those exact bytes
    (a restore replaces nothing else); the archive's own folder is refused. Nothing is left
    behind on failure; a sha256 mismatch raises ``RestoreMismatchError``."""
    from .layout import open_archive
    archive_path, out = Path(archive_path), Path(out)
    archive = open_archive(archive_path)
    meta = archive.metadata
    info = meta.restore_info()
    if not info.get("restorable"):
        raise ArchiveError(f"{archive_path}: cannot give its source file back: {info.get('why', 'no restore data')}")
    folder = archive_path / RESTORE_GROUP
    attrs = _restore_attributes(folder, archive.zarr_format)
    sha256, size = meta["source"]["sha256"], meta["source"]["size"]
    entries = attrs["files"]
    if attrs.get("sha256") != sha256 or sum(e.get("size", 0) for e in entries) != size:
        raise DamagedArchiveError(f"{archive_path}: restore data names another source than the archive: it is damaged")
    many = bool(attrs.get("folder"))
    summary = {"archive": str(archive_path), "restored": str(out), "bytes": size, "sha256": sha256,
               "source": meta["source"]["name"], "files": len(entries), "unchanged": False}
    if _check_output(out, archive_path, overwrite, sha256, many):
        return {**summary, "unchanged": True}  # already these exact bytes (perhaps the source itself): untouched
    temporary = out.with_name(f".{out.name}.restoring-{uuid.uuid4().hex[:12]}")
    try:
        if many:
            temporary.mkdir()
        for k, entry in enumerate(entries):
            target = temporary / entry["name"] if many else temporary
            restore_one(archive, folder / str(k), entry, target, progress)
        if (_folder_digest(temporary) if many else entries[0]["sha256"]) != sha256:
            raise RestoreMismatchError(f"{archive_path}: the restored source does not have the sha256 recorded at "
                                       f"pack time ({sha256[:16]}...): nothing was written")
        if out.exists() or out.is_symlink():  # appeared meanwhile: never replaced
            raise ArchiveError(f"{out} appeared while restoring; it was left untouched")
        temporary.rename(out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True) if temporary.is_dir() else temporary.unlink(missing_ok=True)
        raise
    return summary


def restore_one(archive, folder: Path, entry: dict, target: Path, progress: bool) -> None:
    """One source file from its skeleton and its kept segments, checked against its sha256."""
    import zarr
    try:
        skeleton = zarr.open_array(str(folder / "skeleton"), mode="r")
        table = np.asarray(zarr.open_array(str(folder / "segments"), mode="r")[...], dtype=np.int64)
        if skeleton.ndim != 1 or skeleton.dtype != np.uint8:
            raise ValueError("the skeleton is not bytes")
    except Exception as exc:  # noqa: BLE001 - zarr raises several types for missing or damaged arrays
        raise DamagedArchiveError(f"{folder}: restore data missing or damaged ({type(exc).__name__})") from None
    arrays, affixes = entry["arrays"], [bytes.fromhex(a) for a in entry["affixes"]]
    _check_table(table, len(arrays), len(affixes), entry["size"], skeleton.shape[0], archive.path)
    streams = ChunkStreams(archive, arrays, entry.get("regenerated") or {})
    digest = hashlib.sha256()
    with open(target, "xb") as f:
        def emit(data: bytes) -> None:
            digest.update(data)
            f.write(data)
        at = skel = 0
        bar = _progress(len(table), progress)
        for offset, length, a, r, c, start, stop, prefix, suffix in table.tolist():
            for k in range(skel, skel + offset - at, COPY_BLOCK):
                emit(skeleton[k:min(k + COPY_BLOCK, skel + offset - at)].tobytes())
            skel += offset - at
            data = affixes[prefix] + streams.get(a, r, c)[start:stop] + affixes[suffix]
            if len(data) != length:
                raise DamagedArchiveError(f"{archive.path}: a kept segment at byte {offset} of {entry['name']} "
                                          f"rebuilds to {len(data)} bytes, not {length}: the archive is damaged")
            emit(data)
            at = offset + length
            bar.update(1)
        bar.close()
        for k in range(skel, skeleton.shape[0], COPY_BLOCK):
            emit(skeleton[k:min(k + COPY_BLOCK, skeleton.shape[0])].tobytes())
        f.flush()
        os.fsync(f.fileno())
    written = target.stat().st_size
    if digest.hexdigest() != entry["sha256"] or written != entry["size"]:
        raise RestoreMismatchError(f"{archive.path}: the restored {entry['name']} has sha256 "
                                   f"{digest.hexdigest()[:16]}... ({written} bytes), not the source's "
                                   f"{entry['sha256'][:16]}... ({entry['size']} bytes): nothing was written")


def check_restore_data(archive) -> list[str]:
    """What is damaged in an archive's restore data (each file's skeleton and table against the
    sha256 recorded at pack time), without restoring anything: ``verify`` lists it."""
    import zarr
    if not archive.metadata.restore_info().get("restorable"):
        return []
    folder = archive.path / RESTORE_GROUP
    try:
        attrs = _restore_attributes(folder, archive.zarr_format)
    except DamagedArchiveError as exc:
        return [str(exc)]
    problems = []
    for k, entry in enumerate(attrs["files"]):
        try:
            skeleton = zarr.open_array(str(folder / str(k) / "skeleton"), mode="r")
            digest = hashlib.sha256()
            for start in range(0, skeleton.shape[0], SKELETON_CHUNK):  # a chunk at a time: it can be large
                digest.update(np.asarray(skeleton[start:start + SKELETON_CHUNK], dtype=np.uint8).tobytes())
            table = np.asarray(zarr.open_array(str(folder / str(k) / "segments"), mode="r")[...], dtype=np.int64)
        except Exception as exc:  # noqa: BLE001 - zarr raises several types for missing or damaged arrays
            problems.append(f"restore data of {entry['name']}: unreadable ({type(exc).__name__}: {str(exc)[:80]})")
            continue
        if digest.hexdigest() != entry.get("skeleton_sha256") \
                or hashlib.sha256(table.tobytes()).hexdigest() != entry.get("segments_sha256"):
            problems.append(f"restore data of {entry['name']}: does not match its sha256 (damaged)")
    return problems


def _folder_digest(folder: Path) -> str:
    from ..digests import folder_digest
    return folder_digest([p for p in folder.iterdir() if p.is_file()])


def _restore_attributes(folder: Path, zarr_format: int) -> dict:
    import json
    fmt = FORMATS[zarr_format]
    try:
        attrs = fmt.attributes(json.loads((folder / fmt.root_file).read_text())).get("wsi_idf_restore")
    except (OSError, ValueError, AttributeError):
        attrs = None
    names = set()

    def good(entry: object) -> bool:
        ok = (isinstance(entry, dict) and isinstance(entry.get("name"), str) and 0 < len(entry["name"]) <= 255
              and "/" not in entry["name"] and entry["name"] not in (".", "..") and entry["name"] not in names
              and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)
              and isinstance(entry.get("arrays"), list) and isinstance(entry.get("affixes"), list)
              and all(isinstance(a, str) and len(a) <= 64 for a in entry["affixes"]))
        if ok:
            names.add(entry["name"])
        return ok
    if not isinstance(attrs, dict) or attrs.get("format_version") != RESTORE_FORMAT \
            or not isinstance(attrs.get("files"), list) or not 0 < len(attrs["files"]) <= MAX_FILES \
            or not all(good(e) for e in attrs["files"]):
        raise DamagedArchiveError(f"{folder}: restore data missing or damaged")
    return attrs


def _check_table(table: np.ndarray, arrays: int, affixes: int, size: int, skeleton: int, path: Path) -> None:
    if table.ndim != 2 or table.shape[1] != len(COLUMNS):
        raise DamagedArchiveError(f"{path}: restore table has shape {table.shape}: it is damaged")
    if not len(table):
        ok = skeleton == size
    else:
        offsets, lengths = table[:, 0], table[:, 1]
        ok = (np.all(lengths > 0) and np.all(offsets >= 0) and np.all(offsets[1:] >= offsets[:-1] + lengths[:-1])
              and int(offsets[-1] + lengths[-1]) <= size and int(lengths.sum()) + skeleton == size
              and np.all((table[:, 2] >= 0) & (table[:, 2] < arrays))
              and np.all((table[:, 7:] >= 0) & (table[:, 7:] < affixes))
              and np.all((table[:, 5] >= 0) & (table[:, 6] >= table[:, 5])))
    if not ok:
        raise DamagedArchiveError(f"{path}: restore table does not describe the source file: it is damaged")


def _check_output(out: Path, archive_path: Path, overwrite: bool, sha256: str, many: bool) -> bool:
    """Whether ``out`` already holds the source's exact bytes (then nothing is written: it may be the
    source itself); raises where it holds anything else, or exists without ``overwrite``."""
    from ..digests import file_sha256
    if out.resolve() == archive_path.resolve() or out.resolve().is_relative_to(archive_path.resolve()):
        raise ArchiveError(f"{out} is inside the archive {archive_path}; choose another output")
    if not out.exists() and not out.is_symlink():
        if not out.parent.is_dir():
            raise ArchiveError(f"{out.parent}: no such folder")
        return False
    if not overwrite:
        raise ArchiveError(f"{out} already exists; pass --overwrite to replace it")
    same = not out.is_symlink() and (
        out.is_dir() and _folder_digest(out) == sha256 and all(p.is_file() for p in out.iterdir()) if many
        else out.is_file() and file_sha256(out) == sha256)
    if not same:
        raise ArchiveError(f"{out} exists and is not this archive's source (its sha256 differs); --overwrite "
                           "accepts only a file holding the same bytes, so it was left untouched: choose another output")
    return True


class ChunkStreams:
    """Kept chunks' streams by (array, row, column), read through the checked readers, a few kept at once."""

    def __init__(self, archive, arrays: list[str], recipes: dict, keep: int = 64):
        self.archive, self.arrays, self.recipes, self.keep = archive, arrays, recipes, keep
        self.cache: OrderedDict[tuple[int, int, int], bytes] = OrderedDict()

    def get(self, array: int, row: int, col: int) -> bytes:
        key = (array, row, col)
        if key not in self.cache:
            self.cache[key] = self._read(*key)
            if len(self.cache) > self.keep:
                self.cache.popitem(last=False)
        return self.cache[key]

    def _read(self, array: int, row: int, col: int) -> bytes:
        from ..errors import CorruptPatchError
        from ..storage.source_tiles import decode_chunk
        name = self.arrays[array]
        if name.isdigit():
            reader = self.archive.reader(int(name))
            if reader.storage != "source":
                raise DamagedArchiveError(f"{self.archive.path}: restore data names level {name}, which keeps no tiles")
            blobs, _ = reader.chunks(range(row, row + 1), range(col, col + 1))
            streams: list[bytes] = []
            try:  # its pixels, position and archive checked, the stream kept: a damaged tile names itself
                decode_chunk(blobs[(row, col)], (3, reader.chunk, reader.chunk), (reader.level, row, col),
                             check_position=reader.bound, archive_id=reader.archive_id, streams=streams)
            except CorruptPatchError as exc:
                raise DamagedArchiveError(f"{self.archive.path}: level {name} tile x={col * reader.chunk}, "
                                          f"y={row * reader.chunk} is damaged: {exc}") from None
            return streams[0]
        if not name.startswith("associated/") or name.split("/", 1)[1] not in self.archive.metadata["associated"]:
            raise DamagedArchiveError(f"{self.archive.path}: restore data names an unknown array {name[:40]!r}")
        from .reader import check_small_array
        folder = self.archive.path / name
        shape, chunks, kept = check_small_array(folder, self.archive.zarr_format)
        path = FORMATS[self.archive.zarr_format].small_chunk_file(folder, (row, col, 0))
        try:
            blob = path.read_bytes()
        except OSError:
            raise DamagedArchiveError(f"{path}: chunk missing: the archive is damaged") from None
        streams = []
        try:
            pixels = decode_chunk(blob, chunks, streams=streams)
        except CorruptPatchError as exc:
            raise DamagedArchiveError(f"{path}: {exc}") from None
        recipe = self.recipes.get(name)
        if recipe is not None:
            from ..storage.tiff_strips import encode_strips
            if not isinstance(recipe, dict) or recipe.get("compression") not in ("lzw", "none") \
                    or recipe.get("predictor") not in (1, 2) or not isinstance(recipe.get("rowsperstrip"), int) \
                    or not 0 < recipe["rowsperstrip"] <= shape[0]:
                raise DamagedArchiveError(f"{self.archive.path}: restore recipe of {name} is damaged")
            return b"".join(encode_strips(pixels, recipe))
        return streams[0]


def _progress(total: int, show: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc="restoring", unit="segment", disable=None if show else True, leave=False)
