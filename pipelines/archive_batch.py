"""Archive a folder (or a CSV list) of slides, one archive per slide, with a manifest.

    python pipelines/archive_batch.py /data/slides -o /archive                     # embedded local cluster
    python pipelines/archive_batch.py slides.csv -o /archive --scheduler tcp://head:8786
    python pipelines/archive_batch.py /data/slides -o /archive --slurm --slurm-jobs 8 --slurm-gpus 1

Every slide goes through the same ``wsi_idf.pack_slide`` on the same Dask cluster, whichever way
the cluster was made. A failing slide is recorded in the manifest and the batch goes on.
Running the same command again skips finished archives and resumes interrupted ones.
The manifest (``manifest.csv`` and ``manifest.json`` in the output folder) is rewritten after
every slide: per slide the status, sizes, ratios, bits per sub-pixel, how each level is stored
(idf or source), level checksums, the source's sha256, whether the archive gives the source file
back (``restorable``), whether it was verified, time, error.

``--verify`` checks each archive before its row is marked done: every pixel against the source,
and for a restorable archive a restore to a temporary file whose sha256 must be the source's.
A lab deletes an original only where its row says ``verified`` = ``restored``.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from wsi_idf.archive.layout import read_metadata
from wsi_idf.outputs import write_atomic
from wsi_idf.cli import add_coding_options, configure_logging
from wsi_idf.errors import WsiIdfError
from wsi_idf.jobs.pack import pack_slide, partial_path

log = logging.getLogger("wsi_idf")

SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm"}
FIELDS = ["slide", "archive", "status", "source_bytes", "raw_bytes", "archive_bytes", "ratio_to_raw",
          "ratio_to_source", "bits_per_subpixel", "level_storage", "level_checksums", "source_sha256", "restorable",
          "verified", "model", "adapted", "seconds", "error"]
FIELDS_05 = [f for f in FIELDS if f not in ("model", "adapted")]  # wsi-idf 0.5
FIELDS_04 = [f for f in FIELDS_05 if f not in ("source_sha256", "restorable", "verified")]  # wsi-idf 0.3-0.4
EARLIER_FIELDS = [f for f in FIELDS_04 if f != "level_storage"]  # manifests of wsi-idf 0.1-0.2


def find_slides(source: Path, recursive: bool = False) -> list[Path]:
    """Slide files in a folder (by suffix), or the ``path`` column of a CSV (relative to the CSV). A
    folder holding DICOM files is one slide (a series: its instances are the levels), not one per file."""
    if source.is_dir():
        pattern = "**/*" if recursive else "*"
        found = sorted(p for p in source.glob(pattern) if p.suffix.lower() in SLIDE_SUFFIXES and p.is_file())
        folders = {p.parent for p in found if p.suffix.lower() == ".dcm"} if recursive else \
            {source, *(d for d in source.iterdir() if d.is_dir())}
        series = {folder for folder in folders if one_series(folder)}
        return sorted({p for p in found if p.parent not in series} | series)
    if source.suffix.lower() == ".csv":
        with open(source, newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and "path" not in rows[0]:
            raise WsiIdfError(f"{source}: a slide list needs a 'path' column")
        return [(source.parent / row["path"]).resolve() if not Path(row["path"]).is_absolute() else Path(row["path"])
                for row in rows if row["path"].strip()]
    raise WsiIdfError(f"{source}: give a folder of slides or a CSV with a 'path' column")


def one_series(folder: Path) -> bool:
    """Whether a folder's DICOM files are the instances of one series (two or more): then the folder
    is one slide, as ``wsi-idf pack FOLDER`` reads it; else each file is a slide of its own."""
    import pydicom
    uids = set()
    files = sorted(folder.glob("*.dcm"))
    for path in files:
        try:
            uids.add(str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
                         .get("SeriesInstanceUID", "")))
        except Exception:  # noqa: BLE001 - not DICOM, or damaged: the file is its own (failing) slide
            return False
    return len(files) > 1 and len(uids) == 1


def archive_names(slides: Sequence[Path]) -> dict[Path, str]:
    """``{stem}.zarr`` per slide; slides sharing a stem get their parent folder's name as a prefix."""
    stems: dict[str, int] = {}
    for slide in slides:
        stems[slide.stem] = stems.get(slide.stem, 0) + 1
    return {s: (f"{s.parent.name}-{s.stem}.zarr" if stems[s.stem] > 1 else f"{s.stem}.zarr") for s in slides}


def finished_row(slide: Path, out: Path, earlier: dict | None) -> dict:
    """The manifest row of an archive finished by an earlier run, from its own metadata."""
    meta, _, _ = read_metadata(out)
    source = meta["source"]
    size = sum(f.stat().st_size for f in slide.iterdir() if f.is_file()) if slide.is_dir() else slide.stat().st_size
    if source["name"] != slide.name or source["size"] != size:
        raise WsiIdfError(f"{out} holds another source ({source['name']}, {source['size']} bytes); "
                          "move it away or delete it")
    return {"slide": str(slide), "archive": str(out), "status": "done", **meta.sizes(out),
            "level_storage": ";".join(lv.get("storage", "idf") for lv in meta["levels"]),
            "level_checksums": ";".join(lv["checksum"]["value"] for lv in meta["levels"]),
            "source_sha256": source["sha256"], "restorable": "yes" if meta.restore_info()["restorable"] else "no",
            "verified": (earlier or {}).get("verified", ""), **model_columns(meta), "seconds": (earlier or {}).get("seconds", ""), "error": ""}


def model_columns(meta) -> dict:
    """``model``: the model that coded the slide; ``adapted``: the held-out gain of adapting it, or why not."""
    adaptation = meta.model_facts()["adaptation"]
    if adaptation is None:
        adapted = ""
    elif adaptation.get("skipped"):
        adapted = f"no: {adaptation['skipped']}"
    else:
        gain = 100 * (1 - adaptation["adapted_bpsp"] / adaptation["base_bpsp"])
        adapted = f"{'yes' if adaptation['kept'] == 'adapted' else 'no: the base model wrote less'} ({gain:+.2f}%)"
    return {"model": f"{meta['model']['name']}-{meta['model']['weights'][:8]}", "adapted": adapted}


def verify_row(slide: Path, out: Path, scheduler: str | None) -> str:
    """Verify one archive: every pixel against the source, and a restorable archive restored to a
    temporary file beside it (sha256 checked, then removed). Returns the ``verified`` value."""
    import uuid
    from wsi_idf.archive.restore import restore_file
    from wsi_idf.jobs.verify import verify_archive
    verify_archive(out, source=slide, scheduler=scheduler)
    meta, _, _ = read_metadata(out)
    if not meta.restore_info()["restorable"]:
        return "pixels"
    restored = out.with_name(f".{out.name}.verify-{uuid.uuid4().hex[:12]}{slide.suffix}")
    try:
        restore_file(out, restored)  # raises unless the bytes have the source's sha256
    finally:  # written by this job just now: a file, or a folder for a DICOM series
        shutil.rmtree(restored) if restored.is_dir() and not restored.is_symlink() else restored.unlink(missing_ok=True)
    return "restored"


def check_manifest_is_ours(out_dir: Path) -> None:
    """Refuse an output folder whose manifest files wsi-idf did not write: they would be replaced."""
    if out_dir.exists() and not out_dir.is_dir():
        raise WsiIdfError(f"{out_dir} is a file, not a folder for archives")
    try:
        rows = json.loads((out_dir / "manifest.json").read_text()) if (out_dir / "manifest.json").exists() else []
        json_ours = isinstance(rows, list) and all(isinstance(r, dict) and "slide" in r and "status" in r for r in rows)
        csv_path = out_dir / "manifest.csv"
        csv_ours = not csv_path.exists() or csv_path.read_text().splitlines()[:1] in (
            [",".join(FIELDS)], [",".join(FIELDS_05)], [",".join(FIELDS_04)],
            [",".join(EARLIER_FIELDS)])
    except (OSError, ValueError, UnicodeDecodeError):
        json_ours = csv_ours = False
    if not (json_ours and csv_ours):
        raise WsiIdfError(f"{out_dir} holds a manifest.json or manifest.csv that this batch job did not write; "
                          "it was left untouched: choose another output folder")


def write_manifest(out_dir: Path, rows: list[dict]) -> None:
    rows = [{field: row.get(field, "") for field in FIELDS} for row in rows]  # what this run did is not kept
    write_atomic(out_dir / "manifest.json", json.dumps(rows, indent=2).encode())
    tmp = out_dir / ".manifest.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(out_dir / "manifest.csv")


def run_batch(slides: Sequence[Path], out_dir: Path, scheduler: str | None, progress: bool = False,
              verify: bool = False, **pack_options) -> list[dict]:
    """Pack every slide into ``out_dir`` (and with ``verify`` check each archive, ``verify_row``,
    before its row is done); return (and keep writing) the manifest rows."""
    from tqdm import tqdm
    check_manifest_is_ours(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    earlier = {}
    if (out_dir / "manifest.json").is_file():
        earlier = {row["slide"]: row for row in json.loads((out_dir / "manifest.json").read_text())}
    names = archive_names(slides)
    rows: list[dict] = []
    for slide in tqdm(slides, desc="slides", unit="slide", disable=None if progress else True):  # no bar in logs
        out = out_dir / names[slide]
        row = {"slide": str(slide), "archive": str(out), "status": "failed", "error": ""}
        t0 = time.perf_counter()
        try:
            if out.exists():
                row = {**finished_row(slide, out, earlier.get(str(slide))), "action": "skipped"}
                log.info("%s: already archived, skipped", slide.name)
            else:
                resume = partial_path(out).exists()
                if resume:
                    log.info("%s: resuming an interrupted pack", slide.name)
                summary = pack_slide(slide, out, scheduler=scheduler, resume=resume, progress=progress,
                                     **pack_options)
                row = {**finished_row(slide, out, None), "seconds": summary["seconds"],
                       "action": "resumed" if resume else "archived"}
            if verify and not row.get("verified"):
                row["verified"] = verify_row(slide, out, scheduler)
        except WsiIdfError as exc:
            message = str(exc).removeprefix(f"{slide}: ").removeprefix(f"{slide.name}: ")  # the row names it
            row.update(status="failed", error=message, seconds=round(time.perf_counter() - t0, 2))
            log.warning("%s: %s", slide.name, exc)
        except Exception as exc:  # one slide's unexpected failure must not stop the batch
            row.update(status="failed", error=f"{type(exc).__name__}: {exc}", seconds=round(time.perf_counter() - t0, 2))
            log.warning("%s: %s: %s", slide.name, type(exc).__name__, exc)
        rows.append({**{field: row.get(field, "") for field in FIELDS}, "action": row.get("action", "failed")})
        write_manifest(out_dir, rows)
    return rows


@contextmanager
def cluster_address(args: argparse.Namespace) -> Iterator[str]:
    """The scheduler every slide is packed on: existing, SLURM (dask-jobqueue), or an embedded local one."""
    if args.scheduler:
        yield args.scheduler
        return
    if args.slurm:
        try:
            from dask_jobqueue import SLURMCluster
        except ImportError:
            raise WsiIdfError("--slurm needs dask-jobqueue: pip install dask-jobqueue") from None
        extra = [f"--gres=gpu:{args.slurm_gpus}"] if args.slurm_gpus else []
        worker_args = ["--resources", f"GPU={args.slurm_gpus}"] if args.slurm_gpus else []
        with SLURMCluster(cores=args.slurm_cores, memory=args.slurm_memory, processes=1, queue=args.slurm_queue,
                          walltime=args.slurm_walltime, job_extra_directives=extra,
                          worker_extra_args=worker_args) as cluster:
            cluster.scale(jobs=args.slurm_jobs)
            yield cluster.scheduler_address
        return
    from wsi_idf.jobs.cluster import default_workers, start_local_cluster
    with start_local_cluster(args.workers or default_workers()) as cluster:
        yield cluster.scheduler_address


def check_scheduler(address: str) -> None:
    """Fail the whole batch at once, not slide by slide, when the cluster cannot be reached."""
    from distributed import Client
    try:
        with Client(address, timeout="10s"):
            pass
    except OSError as exc:
        raise WsiIdfError(f"cannot reach the Dask scheduler at {address}: {exc}") from exc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="exit codes: 0 every slide archived, 1 some slide failed (see the "
                                            "manifest), 2 usage error, 130 interrupted (run again to resume)")
    parser.add_argument("source", type=Path, help="a folder of slides, or a CSV with a 'path' column")
    parser.add_argument("-o", "--output", type=Path, required=True, help="folder for the archives and manifest")
    parser.add_argument("--recursive", action="store_true", help="look for slides in sub-folders too")
    add_coding_options(parser)  # as `wsi-idf pack`: --model, --adapt, --device, --codec, --restorable, ...
    parser.add_argument("--verify", action="store_true",
                        help="before a row is marked done: every pixel against the source, and a restorable archive "
                             "restored to a temporary file whose sha256 must be the source's (column 'verified')")
    parser.add_argument("--scheduler", default=None, help="an existing Dask scheduler (tcp://host:port)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes of the embedded cluster")
    parser.add_argument("--slurm", action="store_true", help="start workers as SLURM jobs (dask-jobqueue)")
    parser.add_argument("--slurm-jobs", type=int, default=4)
    parser.add_argument("--slurm-gpus", type=int, default=0, help="GPUs per job: --gres=gpu:N, worker resources GPU=N")
    parser.add_argument("--slurm-cores", type=int, default=8)
    parser.add_argument("--slurm-memory", default="32GB")
    parser.add_argument("--slurm-queue", default=None)
    parser.add_argument("--slurm-walltime", default="12:00:00")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("-q", "--quiet", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")
    args = parser.parse_args(argv)
    configure_logging(logging.ERROR if args.quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)])
    try:
        slides = find_slides(args.source, args.recursive)
        if not slides:
            raise WsiIdfError(f"{args.source}: no slide files found")
        check_manifest_is_ours(args.output)  # before a cluster starts
        with cluster_address(args) as address:
            check_scheduler(address)
            rows = run_batch(slides, args.output, address, progress=not args.quiet, verify=args.verify,
                             model=args.model, device=args.device, drop_label=args.drop_label, codec=args.codec,
                             restorable=args.restorable, adapt=args.adapt, adapt_steps=args.adapt_steps,
                             adapt_seed=args.adapt_seed)
    except WsiIdfError as exc:
        print(f"archive_batch: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("archive_batch: interrupted; run the same command again to finish", file=sys.stderr)
        return 130
    failed = [r for r in rows if r["status"] != "done"]
    if args.json:
        print(json.dumps(rows))
    elif not args.quiet:
        actions = [r["action"] for r in rows]
        print(f"{len(rows)} slide(s): {actions.count('archived')} archived, {actions.count('resumed')} resumed, "
              f"{actions.count('skipped')} already archived (skipped), {len(failed)} failed; in {args.output}, "
              f"manifest {args.output / 'manifest.csv'}")
        for r in failed:
            print(f"failed: {r['slide']}: {r['error']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
