"""Verify an archive: decode every patch through zarr, check each level's checksum, optionally
compare every pixel with the source slide. One Dask task per shard."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .archive import open_archive
from .cluster import runner, set_torch_threads
from .errors import CorruptPatchError, VerificationError, WsiIdfError
from .shards import ShardBox, level_checksum, region_digest, shard_boxes
from .slide import SlideRef, cached_slide, open_slide

_arrays: dict[str, object] = {}
_arrays_lock = threading.Lock()


@dataclass(frozen=True)
class VerifyJob:
    root: str
    source: SlideRef | None
    source_levels: tuple[int, ...]  # archive level -> source level
    torch_threads: int


def _level_array(root: str, level: int):
    import zarr
    key = f"{root}/{level}"
    with _arrays_lock:
        if key not in _arrays:
            _arrays[key] = zarr.open_array(key, mode="r")
        return _arrays[key]


DECODE_ERRORS = (CorruptPatchError, WsiIdfError, ValueError, OSError, RuntimeError)


def damaged_patches(arr, box: ShardBox) -> list[list[int]]:
    """The (level, x, y) of each patch in a shard that does not decode, read one at a time."""
    from .config import PATCH
    damaged = []
    for y in range(box.y0, box.y1, PATCH):
        for x in range(box.x0, box.x1, PATCH):
            try:
                arr[:, y:y + PATCH, x:x + PATCH]
            except DECODE_ERRORS:
                damaged.append([box.level, x, y])
    return damaged


def verify_shard(box: ShardBox, job: VerifyJob) -> dict:
    """Task: decode one shard's region, hash it, and compare it with the source when given."""
    set_torch_threads(job.torch_threads)
    result = {"shard": box.name, "digest": None, "error": None, "damaged": []}
    arr = _level_array(job.root, box.level)
    try:
        region = np.ascontiguousarray(arr[:, box.y0:box.y1, box.x0:box.x1].transpose(1, 2, 0))
    except DECODE_ERRORS as exc:
        result["damaged"] = damaged_patches(arr, box)
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


def verify_archive(path: str | Path, source: str | Path | None = None, backend: str = "auto",
                   scheduler: str | None = None, workers: int | None = None, progress: bool = False) -> dict:
    """Decode everything and check checksums (and the source's pixels); raise ArchiveError on any problem."""
    archive = open_archive(path)
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
    boxes = [box for i, lv in enumerate(meta["levels"]) for box in shard_boxes(i, lv["height"], lv["width"], lv["shard"])]
    results: dict[str, dict] = {}
    with runner(scheduler, workers, "cpu") as run:
        job = VerifyJob(str(archive.path.resolve()), job_source, source_levels, run.torch_threads)
        for result in run.map(verify_shard, boxes, job, progress=progress, desc="verifying"):
            results[result["shard"]] = result
    problems = [f"shard {name}: {r['error']}" for name, r in sorted(results.items()) if r["error"]]
    damaged = sorted(p for r in results.values() for p in r["damaged"])
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
