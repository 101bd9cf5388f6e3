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
from dataclasses import asdict
from pathlib import Path


from .._version import __version__
from ..archive.layout import PREVIEW_MAX, ome_multiscale
from ..archive.metadata import MAX_SHARD, ArchiveMetadata
from ..storage.zarr_formats import FORMATS, is_archive
from .cluster import Runner, runner
from ..config import PATCH
from ..errors import ArchiveError, SlideError, WsiIdfError
from ..outputs import (PLAN_FILE, check_output, is_unfinished_pack, output_lock, remove_stale_temporaries,
                       write_atomic)
from ..coding.policy import require_device
from ..coding.embedded import payload_for_file
from ..coding.registry import ModelChoice, resolve_model
from ..digests import level_checksum
from ..storage.shards import DEFAULT_SHARD, ShardBox, shard_boxes
from ..slide import Slide, open_slide
from .shard_tasks import RECORDS_DIR, LevelLayout, ShardJob, encode_shard, record_path
from .side_arrays import PREVIEW_MAX_SOURCE, create_levels, drop_costly_preview, write_associated, write_preview
from .source_files import check_unchanged, restore_obstacle, source_digests, source_stat, write_restore_data

log = logging.getLogger("wsi_idf")


CODECS = ("auto", "idf", "source")


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


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


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
    check_output(out, overwrite, "archive", (source,), is_ours=is_archive)
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


def pack_slide(source: str | Path, out: str | Path, *, model: str | Path | None = None, device: str = "auto",
               backend: str = "auto", shard: int = DEFAULT_SHARD, zarr_format: int = 3, drop_label: bool = False,
               overwrite: bool = False, resume: bool = False, scheduler: str | None = None,
               workers: int | None = None, resources: dict[str, float] | None = None,
               progress: bool = False, codec: str = "auto", restorable: bool = False,
               adapt: float | str | None = None, adapt_steps: int | None = None, adapt_seed: int = 0) -> dict:
    """Pack ``source`` into the archive ``out``; return a summary (sizes, ratios, bits per sub-pixel, time).

    ``codec``: ``auto`` keeps the source's own tiles where they are lossy (JPEG, JPEG 2000: smaller
    than re-coding their pixels, still pixel-exact) and codes other levels with the IDF;
    ``idf`` codes every level with the IDF; ``source`` keeps every level's tiles or refuses.

    When every level keeps its tiles, the archive also gives the source file back byte for byte
    (``wsi-idf restore``: what is not a kept tile is stored once, in zstd). A level coded from its
    pixels cannot give its own bytes back: ``restorable=True`` stores them too (a larger archive).

    ``model``: a built-in name, a lab's model in the user models folder, or a model file's path. The
    archive carries the model's tensors in each IDF-coded level (``coding.embedded``), so it decodes
    wherever wsi-idf is installed.

    ``adapt`` (minutes, or ``"auto"``: a budget by slide size) fine-tunes the model on this slide first
    and codes with it when it writes fewer bytes on held-out regions (``model.adapt``); ``adapt_steps``
    instead runs exactly that many steps (reproducible given ``adapt_seed``). The adapted weights are
    written before any shard, so ``resume`` reuses them.

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
    choice = resolve_model(model)  # the file's name and hash; the client never loads the model
    if device != "auto":
        require_device(device)  # before anything is written
    weights = choice.sha256
    slide = open_slide(source, backend)
    with slide:  # the client reads metadata and associated images; workers open their own handles
        layouts = plan_layouts(slide, codec, shard, zarr_format)
        not_restorable = restore_obstacle(slide, layouts, drop_label)
        if not_restorable and not restorable:
            log.warning("%s: the archive will not give the source file back: %s", source.name, not_restorable)
        plan = make_plan(slide, source, choice.name, weights, shard, zarr_format, drop_label, layouts)
        plan["restorable"] = restorable
        if adapt is not None or adapt_steps:
            plan["adapt"] = {"budget": adapt, "steps": adapt_steps, "seed": adapt_seed}
        if not out.parent.exists():
            try:
                out.parent.mkdir(parents=True)
            except OSError as exc:
                raise ArchiveError(f"cannot write the archive at {out}: {exc.strerror or exc}") from exc
        with output_lock(out):  # a second job on the same output refuses at once
            root, resumed = prepare_output(out, plan, overwrite, resume, source)
            try:
                with ThreadPoolExecutor(1) as hasher:
                    source_hash = hasher.submit(source_digests, slide)
                    base, adaptation = choice, None
                    if "adapt" in plan:
                        choice, adaptation = adapted_model(root, slide, layouts, choice, plan["adapt"], device)
                        weights = choice.sha256
                    embedded = payload_for_file(choice.path, weights) \
                        if any(layout.storage == "idf" for layout in layouts) else None
                    if not resumed or not (root / "0").exists():
                        create_levels(root, slide, choice.name, weights, layouts, zarr_format, plan["archive_id"],
                                      embedded)
                    with runner(scheduler, workers, device, resources) as run:
                        records, stats = run_shards(run, slide, root, choice, device, layouts,
                                                    zarr_format, progress, plan["archive_id"])
                    archive_id, checksums = plan["archive_id"], {}
                    associated, pieces = write_associated(root, slide, drop_label, zarr_format,
                                                          keep_source=codec != "idf", model=choice.name,
                                                          weights=weights, archive_id=archive_id, checksums=checksums)
                    keeps = any(layout.storage == "source" for layout in layouts)
                    preview_levels = write_preview(root, slide, zarr_format, source.stem, slide.info.mpp,
                                                   PREVIEW_MAX_SOURCE if keeps else PREVIEW_MAX, archive_id, checksums)
                    if keeps:
                        preview_levels = drop_costly_preview(root, records, preview_levels)
                    checksums = {k: v for k, v in checksums.items() if not k.startswith("preview/")
                                 or int(k.split("/")[1]) < preview_levels}
                    sha256, digests = source_hash.result()
                    restore = write_restore_data(root, slide, source, layouts, records, pieces, digests,
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
            meta = ArchiveMetadata.build(
                archive_id=archive_id, checksums=checksums,
                model={"name": choice.name, "weights": weights,
                       **({"embedded": embedded["sha256"], "embedded_bytes": len(embedded["data"])} if embedded else {}),
                       **({"base": {"name": base.name, "weights": base.sha256}, "adaptation": adaptation}
                          if adaptation else {})},
                source={"name": source.name, "size": plan["source"]["size"], "sha256": sha256,
                        "backend": slide.backend, "decoder": info.pop("decoder")},
                slide=info, levels=level_meta, skipped_levels=slide.skipped_levels, associated=associated,
                label_dropped=drop_label and "label" in slide.associated_names(), preview_levels=preview_levels,
                restore=restore)
            multiscale = ome_multiscale(source.stem, [(str(i), lv.downsample) for i, lv in enumerate(slide.levels)],
                                        slide.info.mpp)
            fmt = FORMATS[zarr_format]
            attributes = fmt.image_attributes(multiscale, {"wsi_idf": meta.to_json()})
            ArchiveMetadata.parse(attributes, zarr_format, root)  # never write what the readers would refuse
            fmt.write_group(root, attributes)
            shutil.rmtree(root / RECORDS_DIR, ignore_errors=True)
            (root / PLAN_FILE).unlink(missing_ok=True)
            finish(root, out)
            summary = summarize(out, meta, slide, time.perf_counter() - t0, resumed)
            summary["stage_seconds"] = {k: round(v, 2) for k, v in stats.items() if k.endswith("_s")}
            summary["shards"], summary["shards_reused"] = stats["shards"], stats["shards_reused"]
            summary["workers"] = sorted(str(w) for w in stats["workers"] if w is not None)
            return summary


def adapted_model(root: Path, slide: Slide, layouts: list[LevelLayout], base: ModelChoice, settings: dict,
                  device: str) -> tuple[ModelChoice, dict]:
    """The model to code with after adapting ``base`` to the slide (``model.adapt``), and what was measured.
    Its file and record are kept in the unfinished archive, so a resumed pack reuses them."""
    from ..coding.policy import default_device
    from ..model.adapt import AdaptSettings, adapt_to_slide, auto_minutes
    folder = root / RECORDS_DIR / "model"
    record_file = folder / "adaptation.json"
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        log.info("resuming with the %s model chosen before", record["kept"])
    else:
        idf_levels = [i for i, layout in enumerate(layouts) if layout.storage == "idf"]
        idf_pixels = sum(slide.levels[i].width * slide.levels[i].height for i in idf_levels)
        budget, steps = settings["budget"], settings["steps"]
        minutes = auto_minutes(idf_pixels) if budget == "auto" else float(budget or 0)
        if not idf_levels or not (steps or minutes > 0):
            why = "no level is IDF-coded" if not idf_levels else f"--adapt auto: {idf_pixels / 1e6:.0f} Mpx is too small to pay"
            record = {"kept": "base", "skipped": why}
        else:
            log.info("adapting model %r to the slide (%s)", base.name, f"{steps} steps" if steps else f"{minutes:g} min")
            result = adapt_to_slide(slide, idf_levels, base.path, base.name, folder,
                                    AdaptSettings(minutes, steps, settings["seed"], str(default_device(device))))
            record = {**result.to_json(), "minutes": minutes if not steps else None}
            if result.path is not None:
                record["file"] = result.path.name
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(record_file, json.dumps(record).encode())
    if record.get("file"):
        return resolve_model(folder / record["file"]), record
    return base, record


def run_shards(run: Runner, slide: Slide, root: Path, model: ModelChoice, device: str,
               layouts: list[LevelLayout], zarr_format: int, progress: bool,
               archive_id: str | None = None) -> tuple[dict[str, dict], dict]:
    """Encode every shard not yet recorded; return the records of all shards by name, and the
    seconds per stage summed over the tasks run now with the workers that ran them."""
    job = ShardJob(slide.ref, str(root.resolve()), model.name, model.sha256, device, tuple(layouts), zarr_format,
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


def summarize(out: Path, meta: ArchiveMetadata, slide: Slide, seconds: float, resumed: bool) -> dict:
    return {"archive": str(out), "source": meta["source"]["name"], "model": meta["model"]["name"], **meta.model_facts(),
            "levels": len(meta["levels"]), "skipped_levels": len(meta["skipped_levels"]),
            **meta.sizes(out), "seconds": round(seconds, 2),
            "storage": [{"storage": lv.get("storage", "idf"), "source_codec": lv.get("source_codec")}
                        for lv in meta["levels"]],
            "source_lossy": meta.source_lossy,
            "resumed": resumed, "backend": meta["source"]["backend"], "restorable": bool(meta["restore"].get("restorable")),
            "restore_bytes": meta["restore"].get("stored_bytes", 0), "not_restorable_why": meta["restore"].get("why")}
