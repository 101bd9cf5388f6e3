"""The tasks of a pack: one per shard, reading it from the slide, coding it (IDF patches) or keeping
the source's own tiles, and writing the whole shard object and its record. Workers import this."""
from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import PATCH
from ..coding.policy import default_device, encode_batch_size
from ..digests import region_digest
from ..errors import SlideError
from ..slide import SlideRef, cached_slide
from ..storage.shards import ShardBox, build_shard, cut_patches
from ..outputs import write_atomic
from ..storage.zarr_formats import FORMATS
from .cluster import set_torch_threads


RECORDS_DIR = ".wsi-idf-pack"


@dataclass(frozen=True)

class LevelLayout:
    """How one level is stored: IDF patches, or the source's own tiles (``source_tiles``)."""
    storage: str  # "idf" or "source"
    chunk: int  # 80 for IDF patches; the source's tile side
    shard: int  # pixels, a multiple of chunk
    source_codec: str | None = None  # "jpeg" or "jpeg2000" for source levels


@dataclass(frozen=True)

class ShardJob:
    """Everything a worker needs besides the shard box; small and picklable."""
    slide: SlideRef
    root: str
    model: str
    weights: str
    device: str
    layouts: tuple[LevelLayout, ...]
    zarr_format: int
    torch_threads: int
    archive_id: str | None = None  # enters every chunk's checksum (patch format 4)


def record_path(root: Path, box: ShardBox) -> Path:
    return root / RECORDS_DIR / str(box.level) / f"{box.row}.{box.col}.json"


def encode_shard(box: ShardBox, job: ShardJob) -> dict:
    """Task: read one shard's region from the source, encode its patches in one batch, write it whole."""
    from ..coding.batch import encode_patches
    layout = job.layouts[box.level]
    if layout.storage == "source":
        return keep_source_shard(box, job, layout)
    set_torch_threads(job.torch_threads)
    root = Path(job.root)
    t0 = time.perf_counter()
    region = cached_slide(job.slide).read(box.level, box.y0, box.y1, box.x0, box.x1)
    patches, present = cut_patches(region, layout.shard)
    device = str(default_device(job.device))
    model = level_model(root, box.level, job, device)
    timings = {"read_s": time.perf_counter() - t0}
    per_side = layout.shard // PATCH
    cells = [(box.row * per_side + int(r), box.col * per_side + int(c)) for r, c in np.argwhere(present)]
    blobs = encode_patches(patches, model=model, batch_size=encode_batch_size(device), device=device,
                           timings=timings, positions=[(box.level, r, c) for r, c in cells],
                           archive_id=bytes.fromhex(job.archive_id) if job.archive_id else None)
    t1 = time.perf_counter()
    fmt = FORMATS[job.zarr_format]
    if fmt.sharded:
        write_atomic(fmt.chunk_file(root, box.level, box.row, box.col), build_shard(blobs, present))
    else:
        for blob, (r, c) in zip(blobs, cells):
            write_atomic(fmt.chunk_file(root, box.level, r, c), blob)
    record = {"shard": box.name, "digest": region_digest(region).hex(), "encoded_bytes": sum(map(len, blobs)),
              "patches": len(blobs)}
    write_atomic(record_path(root, box), json.dumps(record).encode())
    timings["write_s"] = time.perf_counter() - t1
    return {**record, "timings": timings, "worker": worker_name()}


def level_model(root: Path, level: int, job: ShardJob, device: str):
    """The model a level is coded with, from the tensors its array carries (``coding.embedded``): what
    readers decode with, found where every worker sees the archive."""
    from ..coding.embedded import configured_model
    array_file = root / str(level) / FORMATS[job.zarr_format].array_file
    payload = _carried_payload(str(array_file), array_file.stat().st_mtime_ns, job.zarr_format)
    return configured_model(job.model, job.weights, payload, device)


@functools.lru_cache(maxsize=8)
def _carried_payload(array_file: str, mtime_ns: int, zarr_format: int) -> dict | None:
    """A level array's carried model, read once per worker process (each task would parse ~0.4 MB of JSON)."""
    from ..archive.reader import read_json
    return (FORMATS[zarr_format].level_codec_config(read_json(Path(array_file))) or {}).get("embedded")


def keep_source_shard(box: ShardBox, job: ShardJob, layout: LevelLayout) -> dict:
    """Task: one shard of a ``source`` level: the source's own tiles, kept bit-exactly (JPEG
    recompressed with JPEG XL), each checked by decoding it as tifffile does. The record lists, per
    kept segment, the piece of its chunk that gives its bytes back (``wsi-idf restore``)."""
    from ..storage.source_tiles import Layout, encode_intervals, encode_segment, max_chunk_bytes
    t0 = time.perf_counter()
    slide = cached_slide(job.slide)
    segments = slide.source_segments(box.level)
    tile, per_side = layout.chunk, layout.shard // layout.chunk
    rows, cols = -(-(box.y1 - box.y0) // tile), -(-(box.x1 - box.x0) // tile)
    cells = [(box.y0 // tile + r, box.x0 // tile + c) for r in range(rows) for c in range(cols)]
    tile_rows = segments.count // segments.across
    members = [[(r * segments.stack + k) * segments.across + c for k in range(segments.stack)
                if r * segments.stack + k < tile_rows] for r, c in cells]
    raw = iter(slide.read_segments(box.level, [i for group in members for i in group]))
    archive_id = bytes.fromhex(job.archive_id) if job.archive_id else None
    t1 = time.perf_counter()
    region = np.empty((rows * tile, cols * tile, 3), dtype=np.uint8)
    blobs, pieces, source_bytes = [], [], 0
    for (r, c), group in zip(cells, members):
        data = [next(raw) for _ in group]
        source_bytes += sum(map(len, data))
        try:
            if segments.stack > 1:
                blob, pixels, kept = encode_intervals(data, segments.coding, group, segments.count, Layout.PLANAR,
                                                      (box.level, r, c), (tile, tile), archive_id)
            else:
                blob, pixels, kept = encode_segment(data[0], segments.coding, (tile, tile), Layout.PLANAR,
                                                    (box.level, r, c), archive_id=archive_id)
        except Exception as exc:  # noqa: BLE001 - the decoders raise several types for damaged tiles
            raise SlideError(f"{Path(job.slide.path).name}: level {box.level} tile at x={c * tile}, y={r * tile} "
                             f"does not decode ({type(exc).__name__}: {exc}): the file is damaged") from None
        if len(blob) > max_chunk_bytes(tile, tile):
            raise SlideError(f"level {box.level} tile ({r}, {c}) takes {len(blob)} bytes, more than twice its raw "
                             "pixels: it cannot be kept; use --codec idf")
        blobs.append(blob)
        pieces += [piece_record(i, (r, c), piece) for i, piece in zip(group, kept)]
        y, x = (r - box.y0 // tile) * tile, (c - box.x0 // tile) * tile
        region[y:y + pixels.shape[0], x:x + pixels.shape[1]] = pixels
    region = region[:box.y1 - box.y0, :box.x1 - box.x0]
    present = np.zeros((per_side, per_side), dtype=bool)
    present[:rows, :cols] = True
    t2 = time.perf_counter()
    write_atomic(FORMATS[job.zarr_format].chunk_file(Path(job.root), box.level, box.row, box.col),
                 build_shard(blobs, present))
    record = {"shard": box.name, "digest": region_digest(region).hex(), "encoded_bytes": sum(map(len, blobs)),
              "patches": len(blobs), "source_bytes": source_bytes, "pieces": pieces}
    write_atomic(record_path(Path(job.root), box), json.dumps(record).encode())
    timings = {"read_s": t1 - t0, "entropy_s": t2 - t1, "write_s": time.perf_counter() - t2}
    return {**record, "timings": timings, "worker": worker_name()}


def piece_record(segment: int, cell: tuple[int, int], piece) -> list:
    """[segment index, chunk row, chunk column, start, stop, prefix hex, suffix hex]: JSON for a shard's record."""
    return [segment, cell[0], cell[1], piece.start, piece.stop, piece.prefix.hex(), piece.suffix.hex()]


def worker_name() -> str | None:
    """The Dask worker running this task (None in process): shows where tasks were routed."""
    try:
        from distributed import get_worker
        return get_worker().name
    except (ImportError, ValueError):
        return None
