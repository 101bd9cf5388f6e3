"""Verify an archive: decode every patch through zarr, check each level's checksum, optionally
compare every pixel with the source slide. One Dask task per shard."""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..archive.layout import open_archive
from .cluster import runner, set_torch_threads
from ..errors import CorruptPatchError, DamagedArchiveError, VerificationError, WsiIdfError
from ..digests import level_checksum, region_digest
from ..storage.shards import ShardBox, shard_boxes
from ..slide import SlideRef, cached_slide, open_slide
from ..storage.zarr_formats import FORMATS

_archives: dict[str, object] = {}
_archives_lock = threading.Lock()


@dataclass(frozen=True)
class VerifyJob:
    root: str
    source: SlideRef | None
    source_levels: tuple[int, ...]  # archive level -> source level
    torch_threads: int
    stamp: int = 0  # the root metadata's mtime: a worker re-opens an archive that was rewritten


def _reader(job: VerifyJob, level: int):
    """The checked level reader every other wsi-idf reader uses, opened once per worker process."""
    with _archives_lock:
        key = f"{job.root}@{job.stamp}"
        if key not in _archives:
            _archives.clear()
            _archives[key] = open_archive(job.root)
        return _archives[key].reader(level)


DECODE_ERRORS = (CorruptPatchError, WsiIdfError, ValueError, OSError, RuntimeError)


def damaged_patches(reader, box: ShardBox) -> list[list[int]]:
    """The [level, x, y] of each patch in a shard that does not decode, read one at a time."""
    side = reader.chunk
    damaged = []
    for y in range(box.y0, box.y1, side):
        for x in range(box.x0, box.x1, side):
            try:
                reader.region(x, y, min(side, box.x1 - x), min(side, box.y1 - y))
            except DECODE_ERRORS:
                damaged.append([box.level, x, y])
    return damaged


def verify_shard(box: ShardBox, job: VerifyJob) -> dict:
    """Task: decode one shard's region, hash it, and compare it with the source when given."""
    set_torch_threads(job.torch_threads)
    result = {"shard": box.name, "digest": None, "error": None, "damaged": []}
    reader = _reader(job, box.level)
    try:
        region, _ = reader.region(box.x0, box.y0, box.x1 - box.x0, box.y1 - box.y0)
    except DECODE_ERRORS as exc:
        result["damaged"] = damaged_patches(reader, box)
        result["error"] = f"cannot decode {len(result['damaged'])} patch(es) ({exc})"
        return result
    result["digest"] = region_digest(region).hex()
    if job.source is not None:
        src = cached_slide(job.source).read(job.source_levels[box.level], box.y0, box.y1, box.x0, box.x1)
        if not np.array_equal(src, region):
            y, x, c = (int(v) for v in np.argwhere(src != region)[0])
            result["error"] = (f"differs from the source, first at x={box.x0 + x}, y={box.y0 + y}, channel {c} "
                               f"({int(region[y, x, c])} vs {int(src[y, x, c])})")
    return result


MISSING_LISTED = 4096  # shards: more missing than this is reported as one problem, not patch by patch


def stored_files(folder: Path, depth: int) -> int:
    """Files exactly ``depth`` folders below ``folder`` (shard files: c/0/ROW/COL; v2 chunks: 0/ROW/COL)."""
    count, stack = 0, [(folder, 0)]
    while stack:
        path, level = stack.pop()
        try:
            with os.scandir(path) as entries:
                for entry in entries:
                    if level + 1 == depth:
                        count += entry.is_file(follow_symlinks=False)
                    elif entry.is_dir(follow_symlinks=False):
                        stack.append((entry.path, level + 1))
        except OSError:
            continue
    return count


def check_stored_count(archive, level: int, lv: dict) -> None:
    """Before listing a level's shards, refuse one whose metadata claims far more than are stored
    (a forged 10^6 x 10^6 level must not make verify build millions of tasks)."""
    from ..config import PATCH
    fmt = FORMATS[archive.zarr_format]
    side = lv["shard"] if fmt.sharded else PATCH  # one file per shard (v3) or per chunk (v2)
    expected = -(-lv["height"] // side) * -(-lv["width"] // side)
    stored = stored_files(fmt.chunk_files_folder(archive.path / str(level)), 2)
    per_shard = 1 if fmt.sharded else (lv["shard"] // PATCH) ** 2
    if expected - stored > MISSING_LISTED * per_shard:
        message = (f"level {level}: {expected - stored:,} of its {expected:,} {'shard' if per_shard == 1 else 'chunk'} "
                   "files are missing (or its size is forged)")
        raise VerificationError(f"{archive.path}: verification failed: {message}", problems=[message])


def check_other_arrays(archive) -> list[str]:
    """Every array besides the levels: associated images and preview levels read in full (each chunk
    against its recorded checksum), folders the metadata does not name, and the restore data."""
    from ..archive.restore import check_restore_data
    from ..errors import ArchiveError
    meta, problems = archive.metadata, []
    for name in meta["associated"]:
        try:
            archive.associated(name)
        except ArchiveError as exc:
            problems.append(f"associated image {name}: {exc}")
    for level in range(meta.get("preview", {}).get("levels", 0)):
        try:
            archive.preview(level)
        except ArchiveError as exc:
            problems.append(f"preview level {level}: {exc}")
    folder = archive.path / "associated"
    stored = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if stored != sorted(meta["associated"]):
        problems.append(f"associated images stored ({', '.join(stored) or 'none'}) are not those the metadata names "
                        f"({', '.join(meta['associated']) or 'none'})")
    return problems + check_restore_data(archive)


def check_embedded_models(archive) -> list[str]:
    """Each IDF-coded level's carried model decodes to the tensors the archive names (read again, not
    from this process's cache: another machine has only these bytes)."""
    from ..archive.reader import read_json
    from ..coding.embedded import coding_bytes
    from ..errors import WsiIdfError
    model, fmt = archive.metadata["model"], FORMATS[archive.zarr_format]
    problems = []
    for i, lv in enumerate(archive.metadata["levels"]):
        if lv.get("storage", "idf") != "idf" or not model.get("embedded"):
            continue
        config = fmt.level_codec_config(read_json(archive.path / str(i) / fmt.array_file)) or {}
        try:
            coding_bytes(config.get("embedded"))
        except WsiIdfError as exc:
            problems.append(f"level {i}'s model: {exc}")
    return problems


def check_stored_bytes(archive) -> list[str]:
    """Each level's ``encoded_bytes`` must be what its chunk files hold (less the shard indexes)."""
    from ..storage.shards import ShardIndex
    fmt = FORMATS[archive.zarr_format]
    problems = []
    for i, lv in enumerate(archive.metadata["levels"]):
        folder = fmt.chunk_files_folder(archive.path / str(i))
        stored = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0
        if fmt.sharded:
            cells = (lv["shard"] // lv.get("chunk", 80)) ** 2
            stored -= len(shard_boxes(i, lv["height"], lv["width"], lv["shard"])) * ShardIndex.nbytes(cells)
        if stored != lv["encoded_bytes"]:
            problems.append(f"level {i}: the metadata says its chunks take {lv['encoded_bytes']:,} bytes; "
                            f"{stored:,} are stored")
    return problems


def verify_archive(path: str | Path, source: str | Path | None = None, backend: str = "auto",
                   scheduler: str | None = None, workers: int | None = None, progress: bool = False) -> dict:
    """Decode everything and check checksums (and the source's pixels); raise ArchiveError on any problem."""
    try:
        archive = open_archive(path)
    except DamagedArchiveError as exc:
        raise VerificationError(f"verification failed: {exc}", problems=[str(exc)]) from None
    problems = check_embedded_models(archive)  # before workers load the model from these bytes
    if problems:
        raise VerificationError(f"{archive.path}: verification failed: {problems[0]}", problems=problems)
    meta = archive.metadata
    job_source, source_levels = None, ()
    if source is not None:
        slide = open_slide(source, backend)
        by_size = {(lv.width, lv.height): i for i, lv in enumerate(slide.levels)}
        try:
            source_levels = tuple(by_size[(lv["width"], lv["height"])] for lv in meta["levels"])
        except KeyError:
            message = (f"{Path(source).name} does not have the levels of this archive: it is not its source "
                       "(or this backend reads fewer levels)")
            raise VerificationError(f"{archive.path}: verification failed: {message}", problems=[message]) from None
        job_source = slide.ref
        slide.close()  # workers open their own handles
    for i, lv in enumerate(meta["levels"]):
        check_stored_count(archive, i, lv)
    boxes = [box for i, lv in enumerate(meta["levels"]) for box in shard_boxes(i, lv["height"], lv["width"], lv["shard"])]
    results: dict[str, dict] = {}
    with runner(scheduler, workers, "cpu") as run:
        root_meta = archive.path / FORMATS[archive.zarr_format].root_file
        job = VerifyJob(str(archive.path.resolve()), job_source, source_levels, run.torch_threads,
                        root_meta.stat().st_mtime_ns)
        for result in run.map(verify_shard, boxes, job, progress=progress, desc="verifying"):
            results[result["shard"]] = result
    problems = [f"shard {name}: {r['error']}" for name, r in sorted(results.items()) if r["error"]]
    damaged = sorted(p for r in results.values() for p in r["damaged"])
    problems += check_other_arrays(archive) + check_stored_bytes(archive)
    for i, lv in enumerate(meta["levels"]):
        digests = [results[b.name]["digest"] for b in shard_boxes(i, lv["height"], lv["width"], lv["shard"])]
        if None not in digests and level_checksum([bytes.fromhex(d) for d in digests]) != lv["checksum"]["value"]:
            problems.append(f"level {i}: checksum of the decoded pixels does not match the one stored at pack time")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise VerificationError(f"{archive.path}: verification failed: {'; '.join(problems[:5])}{more}",
                                damaged=damaged, problems=problems)
    pixels = sum(lv["width"] * lv["height"] for lv in meta["levels"])
    return {"archive": str(archive.path), "levels": len(meta["levels"]), "shards": len(boxes), "pixels": pixels,
            "checksums": "ok", "source_compared": source is not None, "ok": True}
