"""Pack a slide into an archive: one Dask task per shard, each reading, encoding and writing it whole.

The archive is built under ``OUT.partial`` and renamed to ``OUT`` only when complete. Each task
writes its shard object and then a small record (checksum, sizes) by rename, so an interrupted
pack resumes where it stopped (``resume=True``) and ends byte-identical to an uninterrupted one.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .._version import __version__
from ..archive.layout import ARCHIVE_FORMAT, PREVIEW_MAX, PREVIEW_MIN, archive_sizes, ome_multiscale
from ..storage.zarr_formats import FORMATS, remove_stale_temporaries, write_atomic
from .cluster import Runner, runner, set_torch_threads
from ..config import PATCH
from ..errors import ArchiveError, SlideError, WsiIdfError
from ..outputs import PLAN_FILE, check_output, is_unfinished_pack, output_lock
from ..coding.registry import default_device, entry, get_model, model_sha256, require_device
from ..digests import file_sha256, level_checksum, region_digest
from ..storage.shards import DEFAULT_SHARD, ShardBox, build_shard, cut_patches, shard_boxes
from ..slide import LOSSY_COMPRESSIONS, Slide, SlideRef, cached_slide, halve, level_as_dask, open_slide

log = logging.getLogger("wsi_idf")

RECORDS_DIR = ".wsi-idf-pack"
PREVIEW_DOWNSAMPLE = 8  # the preview holds at most 1/64 of level 0's pixels
MAX_SHARD = 5120  # 64 x 64 patches: a 235 MB raw shard at most


CODECS = ("auto", "idf", "source")


@dataclass(frozen=True)
class LevelLayout:
    """How one level is stored: IDF patches, or the source's own tiles (``source_tiles``)."""
    storage: str  # "idf" or "source"
    chunk: int  # 80 for IDF patches; the source's tile side
    shard: int  # pixels, a multiple of chunk
    source_codec: str | None = None  # "jpeg" or "jpeg2000" for source levels


def plan_layouts(slide: Slide, codec: str, shard: int, zarr_format: int) -> list[LevelLayout]:
    """``auto`` keeps the tiles of levels whose tiles are lossy (JPEG, JPEG 2000) and codes the
    others with the IDF; ``source`` insists on keeping them; ``idf`` codes every level's pixels."""
    if codec not in CODECS:
        raise ArchiveError(f"--codec must be one of {', '.join(CODECS)}, got {codec!r}")
    layouts = []
    for i in range(len(slide.levels)):
        keeps = FORMATS[zarr_format].keeps_source_tiles
        segments = slide.source_segments(i) if codec != "idf" and keeps else None
        if segments is None:
            if codec == "source":
                why = "Zarr v2 archives store IDF patches only" if not keeps else \
                    "its tiles are not JPEG or JPEG 2000 tiles this version can keep (or the backend is OpenSlide)"
                raise ArchiveError(f"--codec source: level {i} cannot keep its source tiles ({why}); "
                                   "use --codec auto, which codes such levels with the IDF")
            layouts.append(LevelLayout("idf", PATCH, shard))
        else:
            tile = segments.chunk_height
            layouts.append(LevelLayout("source", tile, tile * max(1, shard // tile), segments.coding.kind))
    return layouts


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


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


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
    model = get_model(job.model, device, weights=job.weights)
    timings = {"read_s": time.perf_counter() - t0}
    per_side = layout.shard // PATCH
    cells = [(box.row * per_side + int(r), box.col * per_side + int(c)) for r, c in np.argwhere(present)]
    blobs = encode_patches(patches, model=model, batch_size=64 if device == "cpu" else 256, device=device,
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


def source_stat(files: list[Path]) -> dict:
    """Size (all files) and latest modification time of a source's files: what must not change while packing."""
    stats = [f.stat() for f in files]
    return {"size": sum(s.st_size for s in stats), "mtime_ns": max(s.st_mtime_ns for s in stats)}


def source_sha256(slide: Slide) -> str:
    """A one-file source's sha256, or a folder's (``restore.folder_digest``)."""
    from ..archive.restore import folder_digest
    return file_sha256(slide.files[0]) if slide.files == [slide.path] else folder_digest(slide.files)


def make_plan(slide: Slide, source: Path, model: str, weights: str, shard: int, zarr_format: int,
              drop_label: bool, layouts: list[LevelLayout] | None = None) -> dict:
    return {"source": {"name": source.name, **source_stat(slide.files)},
            "backend": slide.backend, "model": model, "weights": weights, "shard": shard, "zarr_format": zarr_format,
            "layouts": [asdict(layout) for layout in layouts or []],
            "drop_label": drop_label, "levels": [asdict(lv) for lv in slide.levels], "wsi_idf_version": __version__}


def prepare_output(out: Path, plan: dict, overwrite: bool, resume: bool, source: Path) -> tuple[Path, bool]:
    """The partial folder to build in, and whether it resumes earlier work. Refuses to clobber anything
    wsi-idf did not write (``outputs.check_output``). Sets ``plan["archive_id"]`` (``integrity.plan_archive_id``)."""
    from ..archive.integrity import plan_archive_id
    plan["archive_id"] = plan_archive_id(plan)
    partial = partial_path(out)
    check_output(out, overwrite, "archive", (source,))
    if partial.exists() and not is_unfinished_pack(partial):
        raise ArchiveError(f"{partial} exists and is not an unfinished wsi-idf pack; it was left untouched: "
                           "choose another output or move it away yourself")
    if partial.exists():
        if resume:
            plan_file = partial / PLAN_FILE
            earlier = json.loads(plan_file.read_text()) if plan_file.is_file() else None
            if earlier != plan:
                raise ArchiveError(f"the unfinished pack at {partial} was started with another source or other "
                                   "settings; pass --overwrite to start again")
            remove_stale_temporaries(partial)  # a shard write cut by the kill: the shard is redone
            return partial, True
        if not overwrite:
            raise ArchiveError(f"an unfinished pack exists at {partial}; pass --resume to finish it or "
                               "--overwrite to start again")
        shutil.rmtree(partial)
    try:
        partial.mkdir(parents=True)
        write_atomic(partial / PLAN_FILE, json.dumps(plan).encode())
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise ArchiveError(f"cannot write the archive at {out}: {exc.strerror or exc}") from exc
    return partial, False


def create_levels(root: Path, slide: Slide, model: str, weights: str, layouts: list[LevelLayout],
                  zarr_format: int, archive_id: str | None = None) -> None:
    import zarr
    for i, (lv, layout) in enumerate(zip(slide.levels, layouts)):
        zarr.create_array(store=str(root / str(i)), **FORMATS[zarr_format].level_array_kwargs(
            lv.height, lv.width, layout.shard, model, weights, chunk=layout.chunk, archive=archive_id))


def write_associated(root: Path, slide: Slide, drop_label: bool, zarr_format: int, keep_source: bool = False,
                     model: str = "fast", weights: str | None = None, archive_id: str | None = None,
                     checksums: dict | None = None) -> tuple[list[str], dict[str, list]]:
    """Label, macro and thumbnail images, losslessly; the label is left out on request.

    In zstd by default; with ``keep_source`` (Zarr v3) a JPEG image keeps its own strips or tiles
    (recompressed with JPEG XL) and any other is stored as one lossless JPEG XL chunk, through the
    ``wsi_idf`` codec: several times smaller, and a plain zarr reader with wsi-idf installed reads them.
    Returns the names written and, per image whose segments were kept, their pieces (``piece_record``);
    each array's chunk checksums go into ``checksums`` (``archive.integrity``)."""
    from ..archive.integrity import array_checksums
    import zarr
    names = [n for n in slide.associated_names() if not (drop_label and n == "label")]
    pieces: dict[str, list] = {}
    if not names:
        return [], pieces
    fmt = FORMATS[zarr_format]
    fmt.write_group(root / "associated", {"wsi_idf": {"associated": names}})
    for name in names:
        folder = root / "associated" / name
        if not (keep_source and fmt.keeps_source_tiles):
            image = slide.associated(name)
            arr = zarr.create_array(store=str(folder), **fmt.standard_array_kwargs(image.shape, ("y", "x", "c")))
            arr[...] = image
            chunks = fmt.standard_chunks(image.shape)
        else:
            kept, image, chunks = write_associated_source(folder, slide, name, model, weights)
            if kept:
                pieces[f"associated/{name}"] = kept
        if checksums is not None and archive_id:
            checksums[f"associated/{name}"] = array_checksums(archive_id, f"associated/{name}", image, chunks)
    return names, pieces


def write_associated_source(folder: Path, slide: Slide, name: str, model: str, weights: str | None
                            ) -> tuple[list, np.ndarray, tuple[int, int, int]]:
    import zarr
    from ..storage.source_tiles import Layout, encode_pixels, encode_segment
    from ..storage.zarr_codec import WsiIdfCodec
    image = slide.associated(name)
    h, w, _ = image.shape
    segments = slide.source_segments(name)
    if segments is not None and segments.coding.kind == "jpeg":
        ch, cw, across = segments.height, segments.width, segments.across
        chunks, pieces = {}, []
        for i, data in enumerate(slide.read_segments(name, list(range(segments.count)))):
            r, c = divmod(i, across)
            true = (min(ch, h - r * ch), min(cw, w - c * cw))
            shape = (ch, cw) if segments.tiled else true  # a last strip is short; edge tiles are whole tiles
            try:
                blob, pixels, kept = encode_segment(data, segments.coding, shape, Layout.INTERLEAVED, chunk=(ch, cw))
            except ValueError as exc:
                raise ArchiveError(f"the {name} image's own segments cannot be kept ({exc}); use --codec idf") from None
            if not np.array_equal(pixels[:true[0], :true[1]], image[r * ch:r * ch + true[0], c * cw:c * cw + true[1]]):
                raise ArchiveError(f"the {name} image's own segments do not decode to its pixels; "
                                   "use --codec idf")
            chunks[(r, c)] = blob
            pieces.append(piece_record(i, (r, c), kept[0]))
    else:
        ch, cw = h, w
        chunks, pieces = {(0, 0): encode_pixels(image, Layout.INTERLEAVED)}, []
        recipe = slide.strip_recipe(name)
        if recipe is not None:  # the file's own strips, made again from the pixels (``storage.tiff_strips``)
            from ..storage.tiff_strips import encode_strips
            strips = encode_strips(image, recipe)
            if strips == slide.read_segments(name, list(range(len(strips)))):
                ends = np.cumsum([0] + [len(strip) for strip in strips]).tolist()
                pieces = [[i, 0, 0, ends[i], ends[i + 1], "", "", recipe] for i in range(len(strips))]
    zarr.create_array(store=str(folder), shape=(h, w, 3), chunks=(ch, cw, 3), dtype="uint8", fill_value=0,
                      serializer=WsiIdfCodec(model=model, weights=weights), compressors=None, zarr_format=3,
                      dimension_names=("y", "x", "c"), overwrite=True)
    for (r, c), blob in chunks.items():
        write_atomic(FORMATS[3].small_chunk_file(folder, (r, c, 0)), blob)
    return pieces, image, (ch, cw, 3)


PREVIEW_MAX_SOURCE = 512  # when levels keep their compact source tiles, a zstd preview would dominate the archive


def write_preview(root: Path, slide: Slide, zarr_format: int, name: str, mpp, max_side: int = PREVIEW_MAX,
                  archive_id: str | None = None, checksums: dict | None = None) -> int:
    """A small pyramid (longest side at most 1024 and at least 8x below level 0, halving down to 256) in
    zstd, from the smallest level.

    Viewers without the wsi_idf codec (napari, QuPath, vizarr) open ``archive.zarr/preview``.
    """
    import dask.array as da
    import zarr
    smallest = len(slide.levels) - 1
    lv = slide.levels[smallest]
    factor = 1
    # at most PREVIEW_MAX a side and at least PREVIEW_DOWNSAMPLE below level 0: a preview stays a small
    # fraction of the archive even for a small single-level image
    while ((max(lv.width, lv.height) / factor > max_side or lv.downsample * factor < PREVIEW_DOWNSAMPLE)
           and min(lv.width, lv.height) // (2 * factor) >= 1):
        factor *= 2
    source = level_as_dask(slide.ref, smallest)
    if factor > 1:
        source = source[: lv.height // factor * factor, : lv.width // factor * factor]
        image = da.coarsen(np.sum, source.astype(np.uint32), {0: factor, 1: factor}).compute(scheduler="threads")
        image = ((image + factor * factor // 2) // (factor * factor)).astype(np.uint8)
    else:
        image = source.compute(scheduler="threads")
    datasets = []
    downsample = lv.downsample * factor
    level = 0
    while True:
        planar = np.ascontiguousarray(image.transpose(2, 0, 1))
        arr = zarr.create_array(store=str(root / "preview" / str(level)),
                                **FORMATS[zarr_format].standard_array_kwargs(planar.shape, ("c", "y", "x")))
        arr[...] = planar
        if checksums is not None and archive_id:
            from ..archive.integrity import array_checksums
            checksums[f"preview/{level}"] = array_checksums(archive_id, f"preview/{level}", planar,
                                                            FORMATS[zarr_format].standard_chunks(planar.shape))
        datasets.append((str(level), downsample))
        if max(image.shape[:2]) <= PREVIEW_MIN or min(image.shape[:2]) < 2:
            break
        image = halve(image)
        downsample *= 2
        level += 1
    fmt = FORMATS[zarr_format]
    fmt.write_group(root / "preview", fmt.image_attributes(ome_multiscale(f"{name} preview", datasets, mpp)))
    return len(datasets)


PREVIEW_SHARE = 0.1  # of the levels' bytes: beyond it a zstd preview is left out where levels keep their tiles


def drop_costly_preview(root: Path, records: dict[str, dict], preview_levels: int) -> int:
    """Leave out the zstd preview when it would cost more than a tenth of the kept levels (a small
    slide: its own tiles are smaller than the preview's zstd pixels); its preview levels (0 then)."""
    from ..archive.layout import tree_size
    if tree_size(root / "preview") <= PREVIEW_SHARE * sum(r["encoded_bytes"] for r in records.values()):
        return preview_levels
    shutil.rmtree(root / "preview")  # written by this pack, inside its own unfinished archive
    return 0


def pack_slide(source: str | Path, out: str | Path, *, model: str | None = None, device: str = "auto",
               backend: str = "auto", shard: int = DEFAULT_SHARD, zarr_format: int = 3, drop_label: bool = False,
               overwrite: bool = False, resume: bool = False, scheduler: str | None = None,
               workers: int | None = None, resources: dict[str, float] | None = None,
               progress: bool = False, codec: str = "auto", restorable: bool = False) -> dict:
    """Pack ``source`` into the archive ``out``; return a summary (sizes, ratios, bits per sub-pixel, time).

    ``codec``: ``auto`` keeps the source's own tiles where they are lossy (JPEG, JPEG 2000: smaller
    than re-coding their pixels, still pixel-exact) and codes other levels with the IDF;
    ``idf`` codes every level with the IDF; ``source`` keeps every level's tiles or refuses.

    When every level keeps its tiles, the archive also gives the source file back byte for byte
    (``wsi-idf restore``: what is not a kept tile is stored once, in zstd). A level coded from its
    pixels cannot give its own bytes back: ``restorable=True`` stores them too (a larger archive).

    Bad input raises before anything is written. A failed or interrupted pack leaves only
    ``OUT.partial``, which ``resume=True`` finishes; ``OUT`` appears only when complete.
    ``resources`` (e.g. ``{"GPU": 1}``) restricts the encoding tasks to workers that declare
    them; a CUDA device implies ``{"GPU": 1}``.
    """
    t0 = time.perf_counter()
    source, out = Path(source), Path(out)
    if shard % PATCH or not PATCH <= shard <= MAX_SHARD:
        raise ArchiveError(f"shard size must be a multiple of {PATCH} from {PATCH} to {MAX_SHARD} pixels, got {shard} "
                           "(a shard is one file and one task's memory; a region read decodes whole chunks of it)")
    if zarr_format not in (2, 3):
        raise ArchiveError(f"zarr format must be 2 or 3, got {zarr_format}")
    model_entry = entry(model)
    if device != "auto":
        require_device(device)  # before anything is written
    weights = model_sha256(model_entry.name)  # the file's hash; the client never loads the model
    slide = open_slide(source, backend)
    with slide:  # the client reads metadata and associated images; workers open their own handles
        layouts = plan_layouts(slide, codec, shard, zarr_format)
        not_restorable = restore_obstacle(slide, layouts, drop_label)
        if not_restorable and not restorable:
            log.warning("%s: the archive will not give the source file back: %s", source.name, not_restorable)
        plan = make_plan(slide, source, model_entry.name, weights, shard, zarr_format, drop_label, layouts)
        plan["restorable"] = restorable
        if not out.parent.exists():
            try:
                out.parent.mkdir(parents=True)
            except OSError as exc:
                raise ArchiveError(f"cannot write the archive at {out}: {exc.strerror or exc}") from exc
        with output_lock(out):  # a second job on the same output refuses at once
            root, resumed = prepare_output(out, plan, overwrite, resume, source)
            try:
                with ThreadPoolExecutor(1) as hasher:
                    source_hash = hasher.submit(source_sha256, slide)
                    if not resumed or not (root / "0").exists():
                        create_levels(root, slide, model_entry.name, weights, layouts, zarr_format, plan["archive_id"])
                    with runner(scheduler, workers, device, resources) as run:
                        records, stats = run_shards(run, slide, root, model_entry.name, weights, device, layouts,
                                                    zarr_format, progress, plan["archive_id"])
                    archive_id, checksums = plan["archive_id"], {}
                    associated, pieces = write_associated(root, slide, drop_label, zarr_format,
                                                          keep_source=codec != "idf", model=model_entry.name,
                                                          weights=weights, archive_id=archive_id, checksums=checksums)
                    keeps = any(layout.storage == "source" for layout in layouts)
                    preview_levels = write_preview(root, slide, zarr_format, source.stem, slide.info.mpp,
                                                   PREVIEW_MAX_SOURCE if keeps else PREVIEW_MAX, archive_id, checksums)
                    if keeps:
                        preview_levels = drop_costly_preview(root, records, preview_levels)
                    checksums = {k: v for k, v in checksums.items() if not k.startswith("preview/")
                                 or int(k.split("/")[1]) < preview_levels}
                    sha256 = source_hash.result()
                    restore = write_restore_data(root, slide, source, layouts, records, pieces, sha256,
                                                 zarr_format, not_restorable, restorable)
                    check_unchanged(slide, plan["source"])
            except SlideError:
                shutil.rmtree(root, ignore_errors=True)  # the source is unreadable: resuming cannot help
                raise
            except (KeyboardInterrupt, WsiIdfError):
                raise
            except Exception as exc:  # a lost cluster, a full disk, a killed worker: the work done so far is kept
                raise ArchiveError(f"pack stopped ({type(exc).__name__}: {exc}); the unfinished archive is kept at "
                                   f"{root}: run the same command with --resume to finish it") from exc
            level_meta = []
            for i, (lv, layout) in enumerate(zip(slide.levels, layouts)):
                recs = [records[box.name] for box in shard_boxes(i, lv.height, lv.width, layout.shard)]
                entry_ = {"path": str(i), "width": lv.width, "height": lv.height, "downsample": lv.downsample,
                          "shard": layout.shard, "storage": layout.storage, "chunk": layout.chunk,
                          "patches": sum(r["patches"] for r in recs), "encoded_bytes": sum(r["encoded_bytes"] for r in recs),
                          "checksum": {"algorithm": f"sha256-of-{layout.shard}px-tile-sha256s",
                                       "value": level_checksum([bytes.fromhex(r["digest"]) for r in recs])}}
                if layout.storage == "source":
                    entry_["source_codec"] = layout.source_codec
                    entry_["source_bytes"] = sum(r["source_bytes"] for r in recs)
                level_meta.append(entry_)
            info = slide.info.to_json()
            if any(layout.source_codec == "jpeg" for layout in layouts):  # kept JPEG tiles are read through libjxl
                import imagecodecs
                info["decoder"] = {**info["decoder"], "jpegxl": imagecodecs.jpegxl_version()}
            if drop_label:
                info["properties"] = {k: v for k, v in info["properties"].items()
                                      if not k.startswith("openslide.associated.label.")}
            from ..archive.integrity import ALGORITHM
            meta = {"format_version": ARCHIVE_FORMAT, "wsi_idf_version": __version__, "archive_id": archive_id,
                    "checksums": {"algorithm": ALGORITHM, "arrays": checksums},
                    "model": {"name": model_entry.name, "weights": weights},
                    "source": {"name": source.name, "size": plan["source"]["size"], "sha256": sha256,
                               "backend": slide.backend, "decoder": info.pop("decoder")},
                    "slide": info, "levels": level_meta, "skipped_levels": slide.skipped_levels,
                    "associated": associated, "label_dropped": drop_label and "label" in slide.associated_names(),
                    "preview": {"path": "preview", "levels": preview_levels}, "restore": restore}
            multiscale = ome_multiscale(source.stem, [(str(i), lv.downsample) for i, lv in enumerate(slide.levels)],
                                        slide.info.mpp)
            fmt = FORMATS[zarr_format]
            fmt.write_group(root, fmt.image_attributes(multiscale, {"wsi_idf": meta}))
            shutil.rmtree(root / RECORDS_DIR, ignore_errors=True)
            (root / PLAN_FILE).unlink(missing_ok=True)
            finish(root, out)
            summary = summarize(out, meta, slide, time.perf_counter() - t0, resumed)
            summary["stage_seconds"] = {k: round(v, 2) for k, v in stats.items() if k.endswith("_s")}
            summary["shards"], summary["shards_reused"] = stats["shards"], stats["shards_reused"]
            summary["workers"] = sorted(str(w) for w in stats["workers"] if w is not None)
            return summary


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
                       pieces: dict[str, list], sha256: str, zarr_format: int, obstacle: str | None,
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
    return write_restore(root, slide.files, offsets, pieces, file_of, source.name, sha256, zarr_format)


def run_shards(run: Runner, slide: Slide, root: Path, model: str, weights: str, device: str,
               layouts: list[LevelLayout], zarr_format: int, progress: bool,
               archive_id: str | None = None) -> tuple[dict[str, dict], dict]:
    """Encode every shard not yet recorded; return the records of all shards by name, and the
    seconds per stage summed over the tasks run now with the workers that ran them."""
    job = ShardJob(slide.ref, str(root.resolve()), model, weights, device, tuple(layouts), zarr_format,
                   run.torch_threads, archive_id)
    records: dict[str, dict] = {}
    todo: list[ShardBox] = []
    for i, (lv, layout) in enumerate(zip(slide.levels, layouts)):
        for box in shard_boxes(i, lv.height, lv.width, layout.shard):
            path = record_path(root, box)
            if path.is_file():
                records[box.name] = json.loads(path.read_text())
            else:
                todo.append(box)
    if records:
        log.info("resuming: %d of %d shards already done", len(records), len(records) + len(todo))
    stats = {"read_s": 0.0, "model_s": 0.0, "entropy_s": 0.0, "write_s": 0.0, "workers": set(),
             "shards_reused": len(records), "shards": len(records) + len(todo)}
    for record in run.map(encode_shard, todo, job, progress=progress, desc="packing"):
        for key, seconds in record.pop("timings").items():
            stats[key] += seconds
        stats["workers"].add(record.pop("worker"))
        records[record["shard"]] = record
    return records, stats


def finish(root: Path, out: Path) -> None:
    """Rename the finished archive into place; an archive it replaces is removed only afterwards."""
    old = None
    if out.exists():  # an archive (checked by prepare_output); a fresh name, so nothing else is touched
        old = out.with_name(f".{out.name}.replaced-{uuid.uuid4().hex[:12]}")
        out.rename(old)
    root.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def summarize(out: Path, meta: dict, slide: Slide, seconds: float, resumed: bool) -> dict:
    compression = meta["source"]["decoder"].get("compression", "")
    return {"archive": str(out), "source": meta["source"]["name"], "model": meta["model"]["name"],
            "levels": len(meta["levels"]), "skipped_levels": len(meta["skipped_levels"]),
            **archive_sizes(out, meta), "seconds": round(seconds, 2),
            "storage": [{"storage": lv.get("storage", "idf"), "source_codec": lv.get("source_codec")}
                        for lv in meta["levels"]],
            "source_lossy": compression in LOSSY_COMPRESSIONS or slide.backend == "openslide" and
            slide.info.vendor in {"aperio", "hamamatsu", "mirax", "leica", "philips", "ventana"},
            "resumed": resumed, "backend": meta["source"]["backend"], "restorable": bool(meta["restore"].get("restorable")),
            "restore_bytes": meta["restore"].get("stored_bytes", 0), "not_restorable_why": meta["restore"].get("why")}
