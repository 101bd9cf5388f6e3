"""The source file back, byte for byte, from an archive (``wsi-idf restore``).

A kept tile's bytes are in its chunk already (``source_tiles.Piece``). What is not pixel data
(TIFF headers, IFDs, JPEG tables, vendor tags, images that were coded from pixels) is stored
once, as the **skeleton**: the source file with every kept segment's byte range cut out, in zstd.
Beside it a table gives each kept segment's place in the file and in its chunk::

    slide.zarr/restore/
      zarr.json       attributes: the source's name, size and sha256, the arrays the table names,
                      the prefixes and suffixes its pieces use (hex)
      skeleton/       (n,) uint8, zstd: the file's bytes outside the kept segments, in file order
      segments/       (count, 9) int64, zstd: file offset, length, array, chunk row, chunk column,
                      start and stop in the chunk's stream, prefix and suffix (indices)

Restoring walks the table in file order, writing skeleton bytes up to each segment and the
segment rebuilt from its chunk; the result must have the recorded sha256 before it is renamed
into place. A level coded from its pixels (a lossless source's deflate or LZW tiles) cannot
give its bytes back: then the archive is restorable only if ``pack --restorable`` kept them in
the skeleton.
"""
from __future__ import annotations

import hashlib
import os
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


class RestoreMismatchError(ArchiveError):
    """The restored bytes do not have the sha256 recorded at pack time (exit code 3)."""


def write_restore(root: Path, source: Path, offsets: dict[str, tuple[np.ndarray, np.ndarray]],
                  pieces: dict[str, list], sha256: str, zarr_format: int) -> dict:
    """Write ``restore/`` for ``source``: ``pieces`` per array path (``pack.piece_record`` lists), and
    for each such array its segments' file ``offsets`` (offsets, byte counts). Returns the summary
    recorded in the root metadata."""
    import zarr
    arrays = sorted(pieces)
    affixes: dict[str, int] = {"": 0}
    rows = []
    recipes = {}
    for a, name in enumerate(arrays):
        starts, counts = offsets[name]
        for segment, r, c, start, stop, prefix, suffix, *recipe in pieces[name]:
            if recipe:  # strips made again from the pixels (``storage.tiff_strips``)
                recipes[name] = recipe[0]
            rows.append((int(starts[segment]), int(counts[segment]), a, r, c, start, stop,
                         affixes.setdefault(prefix, len(affixes)), affixes.setdefault(suffix, len(affixes))))
    table = np.array(sorted(rows), dtype=np.int64).reshape(-1, len(COLUMNS))
    size = source.stat().st_size
    ends = table[:, 0] + table[:, 1]
    if len(table) and (np.any(table[1:, 0] < ends[:-1]) or int(ends.max()) > size or np.any(table[:, 1] <= 0)):
        raise ArchiveError(f"{source.name}: its kept segments overlap or leave the file: it cannot be restored")
    skeleton = bytearray()
    with open(source, "rb") as f:
        at = 0
        for offset, length in table[:, :2].tolist():
            f.seek(at)
            skeleton += f.read(offset - at)
            at = offset + length
        f.seek(at)
        skeleton += f.read()
    if len(skeleton) != size - int(table[:, 1].sum()):
        raise ArchiveError(f"{source.name}: changed while it was packed: the restore data cannot be made")
    fmt = FORMATS[zarr_format]
    folder = root / RESTORE_GROUP
    attrs = {"format_version": RESTORE_FORMAT, "name": source.name, "size": size, "sha256": sha256,
             "arrays": arrays, "affixes": list(affixes), "columns": list(COLUMNS), "regenerated": recipes}
    fmt.write_group(folder, {"wsi_idf_restore": attrs})
    for name, data, chunks in (("skeleton", np.frombuffer(bytes(skeleton), np.uint8), (SKELETON_CHUNK,)),
                               ("segments", table, (1 << 16, len(COLUMNS)))):
        kwargs = fmt.standard_array_kwargs(data.shape, ("i",) if data.ndim == 1 else ("i", "j"))
        kwargs.update(dtype=data.dtype, chunks=tuple(min(c, max(1, s)) for c, s in zip(chunks, data.shape)))
        if zarr_format == 3:
            kwargs["dimension_names"] = None
        arr = zarr.create_array(store=str(folder / name), **kwargs)
        if data.size:
            arr[...] = data
    return {"restorable": True, "skeleton_bytes": len(skeleton), "segments": len(table),
            "stored_bytes": directory_bytes(folder)}


def directory_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def restore_info(meta: dict) -> dict:
    """Whether an archive gives its source back, and why not (from the root metadata)."""
    info = meta.get("restore")
    if not isinstance(info, dict):
        return {"restorable": False, "why": "written before wsi-idf 0.5 (no restore data)"}
    return info


def restore_file(archive_path: str | Path, out: str | Path, overwrite: bool = False, progress: bool = False) -> dict:
    """Write the archive's source file to ``out``, byte for byte, checked against its sha256.

    ``out`` may exist only with ``overwrite`` and only when it already holds those exact bytes
    (a restore replaces nothing else); the archive's own folder is refused. Nothing is left
    behind on failure; a sha256 mismatch raises ``RestoreMismatchError``."""
    import zarr
    from .layout import open_archive
    archive_path, out = Path(archive_path), Path(out)
    archive = open_archive(archive_path)
    meta = archive.metadata
    info = restore_info(meta)
    if not info.get("restorable"):
        raise ArchiveError(f"{archive_path}: cannot give its source file back: {info.get('why', 'no restore data')}")
    folder = archive_path / RESTORE_GROUP
    attrs = _restore_attributes(folder, archive.zarr_format)
    sha256, size = meta["source"]["sha256"], meta["source"]["size"]
    if attrs.get("sha256") != sha256 or attrs.get("size") != size:
        raise DamagedArchiveError(f"{archive_path}: restore data names another source than the archive: it is damaged")
    _check_output(out, archive_path, overwrite, sha256)
    group = zarr.open_group(str(folder), mode="r")
    skeleton, table = group["skeleton"], np.asarray(group["segments"][...], dtype=np.int64)
    arrays, affixes = attrs["arrays"], [bytes.fromhex(a) for a in attrs["affixes"]]
    _check_table(table, len(arrays), len(affixes), size, skeleton.shape[0], archive_path)
    streams = ChunkStreams(archive, arrays, attrs.get("regenerated") or {})
    temporary = out.with_name(f".{out.name}.restoring-{uuid.uuid4().hex[:12]}")
    digest = hashlib.sha256()
    try:
        with open(temporary, "xb") as f:
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
                    raise DamagedArchiveError(f"{archive_path}: a kept segment at byte {offset} rebuilds to "
                                              f"{len(data)} bytes, not {length}: the archive is damaged")
                emit(data)
                at = offset + length
                bar.update(1)
            bar.close()
            for k in range(skel, skeleton.shape[0], COPY_BLOCK):
                emit(skeleton[k:min(k + COPY_BLOCK, skeleton.shape[0])].tobytes())
            f.flush()
            os.fsync(f.fileno())
        written = temporary.stat().st_size
        if digest.hexdigest() != sha256 or written != size:
            raise RestoreMismatchError(f"{archive_path}: the restored file has sha256 {digest.hexdigest()[:16]}... "
                                       f"({written} bytes), not the source's {sha256[:16]}... ({size} bytes): "
                                       "nothing was written")
        os.replace(temporary, out)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return {"archive": str(archive_path), "restored": str(out), "bytes": size, "sha256": sha256,
            "source": meta["source"]["name"]}


def _restore_attributes(folder: Path, zarr_format: int) -> dict:
    import json
    fmt = FORMATS[zarr_format]
    try:
        attrs = fmt.attributes(json.loads((folder / fmt.root_file).read_text())).get("wsi_idf_restore")
    except (OSError, ValueError, AttributeError):
        attrs = None
    if not isinstance(attrs, dict) or attrs.get("format_version") != RESTORE_FORMAT \
            or not isinstance(attrs.get("arrays"), list) or not isinstance(attrs.get("affixes"), list) \
            or not all(isinstance(a, str) and len(a) <= 64 for a in attrs["affixes"]):
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


def _check_output(out: Path, archive_path: Path, overwrite: bool, sha256: str) -> None:
    from ..digests import file_sha256
    if out.resolve() == archive_path.resolve() or out.resolve().is_relative_to(archive_path.resolve()):
        raise ArchiveError(f"{out} is inside the archive {archive_path}; choose another output")
    if not out.exists() and not out.is_symlink():
        if not out.parent.is_dir():
            raise ArchiveError(f"{out.parent}: no such folder")
        return
    if not overwrite:
        raise ArchiveError(f"{out} already exists; pass --overwrite to replace it")
    if out.is_symlink() or not out.is_file() or file_sha256(out) != sha256:
        raise ArchiveError(f"{out} exists and is not this archive's source file (its sha256 differs); --overwrite "
                           "only replaces a file with the same bytes, so it was left untouched: choose another output")


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
        from ..storage.source_tiles import chunk_stream, decode_chunk
        name = self.arrays[array]
        if name.isdigit():
            reader = self.archive.reader(int(name))
            if reader.storage != "source":
                raise DamagedArchiveError(f"{self.archive.path}: restore data names level {name}, which keeps no tiles")
            blobs, _ = reader.chunks(range(row, row + 1), range(col, col + 1))
            blob = blobs[(row, col)]
            reader.decode([blob], [(row, col)])  # its pixels and position checked: a damaged tile names itself
            return chunk_stream(blob)
        if not name.startswith("associated/") or name.split("/", 1)[1] not in self.archive.metadata["associated"]:
            raise DamagedArchiveError(f"{self.archive.path}: restore data names an unknown array {name[:40]!r}")
        from .layout import check_small_array
        folder = self.archive.path / name
        shape, chunks, kept = check_small_array(folder, self.archive.zarr_format)
        path = FORMATS[self.archive.zarr_format].small_chunk_file(folder, (row, col, 0))
        try:
            blob = path.read_bytes()
        except OSError:
            raise DamagedArchiveError(f"{path}: chunk missing: the archive is damaged") from None
        from ..errors import CorruptPatchError
        try:
            pixels = decode_chunk(blob, chunks)
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
        return chunk_stream(blob)


def _progress(total: int, show: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc="restoring", unit="segment", disable=not show, leave=False)
