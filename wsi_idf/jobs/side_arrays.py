"""What a pack writes besides the level shards: the level arrays' metadata, the associated images
(zstd, or kept from the source) and the zstd preview pyramid, each with its chunk checksums."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from ..archive.layout import PREVIEW_MAX, PREVIEW_MIN, ome_multiscale
from ..errors import ArchiveError
from ..slide import Slide, halve, level_as_dask
from ..outputs import write_atomic
from ..storage.zarr_formats import FORMATS
from .shard_tasks import LevelLayout, piece_record


def create_levels(root: Path, slide: Slide, model: str, weights: str, layouts: list[LevelLayout],
                  zarr_format: int, archive_id: str | None = None, embedded: dict | None = None) -> None:
    """The level arrays' metadata; IDF-coded levels carry the model's tensors (``embedded``)."""
    import zarr
    for i, (lv, layout) in enumerate(zip(slide.levels, layouts)):
        zarr.create_array(store=str(root / str(i)), **FORMATS[zarr_format].level_array_kwargs(
            lv.height, lv.width, layout.shard, model, weights, chunk=layout.chunk, archive=archive_id,
            embedded=embedded if layout.storage == "idf" else None))


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


PREVIEW_DOWNSAMPLE = 8  # the preview holds at most 1/64 of level 0's pixels


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
    from ..archive.metadata import tree_size
    if tree_size(root / "preview") <= PREVIEW_SHARE * sum(r["encoded_bytes"] for r in records.values()):
        return preview_levels
    shutil.rmtree(root / "preview")  # written by this pack, inside its own unfinished archive
    return 0
