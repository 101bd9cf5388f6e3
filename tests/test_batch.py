"""Batch archiving on real distributed components: `dask scheduler` and `dask worker` processes on loopback."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import NO_DATA
from pipelines.archive_batch import main as batch_main
from slides import CMU_SVS, mosaic, pyramid, write_pyramidal_tiff
from wsi_idf import open_archive
from wsi_idf.errors import ClusterError
from wsi_idf.jobs.pack import RECORDS_DIR, pack_slide, partial_path
from wsi_idf.jobs.verify import verify_archive

pytestmark = pytest.mark.skipif(not CMU_SVS.exists(), reason=NO_DATA)
REPO = Path(__file__).resolve().parents[1]
DASK = str(Path(sys.executable).parent / "dask")


def start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([DASK, *args], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def start_worker(scheduler_file: Path, name: str, folder: Path, *extra: str) -> subprocess.Popen:
    """A worker without a nanny, so killing its process kills the worker (no restart)."""
    return start(["worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1", "--no-nanny",
                  "--no-dashboard", "--name", name, *extra], folder / f"worker-{name}.log")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """`dask scheduler` plus two `dask worker` processes; one declares the resource GPU=1."""
    from distributed import Client
    folder = tmp_path_factory.mktemp("cluster")
    scheduler_file = folder / "scheduler.json"
    procs = [start(["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                    "--scheduler-file", str(scheduler_file)], folder / "scheduler.log")]
    deadline = time.time() + 60
    while not scheduler_file.exists() and time.time() < deadline:
        time.sleep(0.2)
    procs.append(start_worker(scheduler_file, "plain", folder))
    procs.append(start_worker(scheduler_file, "gpu", folder, "--resources", "GPU=1"))
    address = json.loads(scheduler_file.read_text())["address"]
    with Client(address) as client:
        client.wait_for_workers(2, timeout=120)
    yield {"address": address, "file": scheduler_file, "folder": folder}
    for proc in reversed(procs):  # workers first; they would wait for a lost scheduler
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def slides_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("slides")
    for seed, (h, w) in enumerate([(400, 560), (330, 500), (520, 410)]):
        write_pyramidal_tiff(folder / f"case-{seed}.tif", pyramid(mosaic(h, w, seed=20 + seed), 2))
    (folder / "broken.svs").write_text("this is not a slide\n")
    return folder


def test_encoding_is_routed_by_resources(cluster, slides_dir, tmp_path):
    out = tmp_path / "routed.zarr"
    summary = pack_slide(slides_dir / "case-0.tif", out, scheduler=cluster["address"], resources={"GPU": 1},
                         shard=160)
    assert summary["workers"] == ["gpu"]
    assert set(summary["stage_seconds"]) == {"read_s", "model_s", "entropy_s", "write_s"}
    with pytest.raises(ClusterError, match="no worker"):
        pack_slide(slides_dir / "case-1.tif", tmp_path / "nowhere.zarr", scheduler=cluster["address"],
                   resources={"TPU": 1})
    assert not (tmp_path / "nowhere.zarr").exists()


def test_a_killed_worker_does_not_stop_the_job(cluster, tmp_path):
    source = write_pyramidal_tiff(tmp_path / "big.tif", pyramid(mosaic(1000, 1360, seed=31), 2))
    victim = start_worker(cluster["file"], "victim", cluster["folder"])
    from distributed import Client
    with Client(cluster["address"]) as client:
        client.wait_for_workers(3, timeout=120)
    out = tmp_path / "big.zarr"
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(pack_slide(source, out, scheduler=cluster["address"],
                                                                      shard=160)))
    thread.start()
    records = partial_path(out) / RECORDS_DIR / "0"
    deadline = time.time() + 300
    while len(list(records.glob("*.json"))) < 6 and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)
    thread.join(timeout=600)
    assert result and not partial_path(out).exists()
    verify_archive(out, source=source, scheduler="synchronous")


def test_batch_archives_a_folder_records_failures_and_skips_finished(cluster, slides_dir, tmp_path, capsys):
    out = tmp_path / "archive"
    argv = [str(slides_dir), "-o", str(out), "--scheduler", cluster["address"], "-q"]
    assert batch_main(argv) == 1  # broken.svs fails, the others are archived
    rows = json.loads((out / "manifest.json").read_text())
    by_name = {Path(r["slide"]).name: r for r in rows}
    assert by_name["broken.svs"]["status"] == "failed" and "not a slide" in by_name["broken.svs"]["error"]
    for name in ["case-0.tif", "case-1.tif", "case-2.tif"]:
        row = by_name[name]
        assert row["status"] == "done" and row["archive_bytes"] > 0 and len(row["level_checksums"].split(";")) == 2
        assert row["level_storage"] == "idf;idf"  # zlib tiles are lossless: coded with the IDF
        assert open_archive(row["archive"]).metadata["source"]["name"] == name
    assert (out / "manifest.csv").read_text().startswith("slide,archive,status,")
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*.zarr/zarr.json")}
    assert batch_main(argv + ["--json"]) == 1
    again = json.loads(capsys.readouterr().out)
    assert [r["status"] for r in again] == [r["status"] for r in rows]
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.zarr/zarr.json")} == mtimes  # skipped, not redone
    assert sorted(r["action"] for r in again) == ["failed", "skipped", "skipped", "skipped"]
    assert batch_main(argv[:-1]) == 1  # the summary says what this run did, each failure names its slide once
    text = capsys.readouterr().out
    assert "0 archived, 0 resumed, 3 already archived (skipped), 1 failed" in text
    failure = next(line for line in text.splitlines() if line.startswith("failed:"))
    assert failure.count("broken.svs") == 1, failure


def test_batch_killed_midway_completes_on_rerun(slides_dir, tmp_path, capsys):
    out = tmp_path / "archive"
    cmd = [sys.executable, "-m", "pipelines.archive_batch", str(slides_dir), "-o", str(out), "--workers", "1", "-q"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob("*.partial/" + RECORDS_DIR + "/0/*.json")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(out.glob("*.partial"))  # an interrupted pack is left to finish
    assert batch_main(["--scheduler", "tcp://127.0.0.1:1", str(slides_dir), "-o", str(out), "-q"]) == 1
    assert "cannot reach the Dask scheduler" in capsys.readouterr().err
    assert batch_main([str(slides_dir), "-o", str(out), "--workers", "1", "-q"]) == 1
    rows = json.loads((out / "manifest.json").read_text())
    assert sorted(r["status"] for r in rows) == ["done", "done", "done", "failed"]
    assert not list(out.glob("*.partial"))
    for row in rows:
        if row["status"] == "done":
            verify_archive(row["archive"], source=row["slide"], scheduler="synchronous")


def test_embedded_cluster_workers_keep_freed_memory_for_reuse():
    """Workers wsi-idf starts get its allocator setting, not Dask's MALLOC_TRIM_THRESHOLD_=65536 (which
    unmaps every large tensor: a 52.5 Mpx pack ran at 0.57-0.60 Mpx/s with it, 0.90 without), even
    after a cluster with Dask's defaults wrote that value into this process's os.environ."""
    code = """
import json, os
from wsi_idf.coding.threads import ALLOCATOR_ENV, allocator_environ
from wsi_idf.jobs.cluster import runner
from distributed import LocalCluster
with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0"):
    pass  # Dask's defaults: its nanny sets MALLOC_TRIM_THRESHOLD_=65536 in os.environ here
assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "65536"
wanted = allocator_environ()
with runner(None, workers=1, device="cpu") as run:
    seen = run.client.run(lambda: {k: os.environ.get(k) for k in ALLOCATOR_ENV})
print(json.dumps([wanted, list(seen.values())]))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    wanted, seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert wanted == {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}
    assert seen == [wanted]


def test_batch_verify_records_sha256_restorable_and_a_checked_restore(cluster, tmp_path, capsys):
    """A lab deletes an original only where the row says verified = restored: pixels compared and
    the source file rebuilt with its sha256, before the row is marked done."""
    import hashlib
    import shutil
    from pipelines.archive_batch import FIELDS_04
    from slides import NDPI_DAPI
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copyfile(NDPI_DAPI, folder / NDPI_DAPI.name)
    write_pyramidal_tiff(folder / "lossless.tif", pyramid(mosaic(300, 260, seed=4), 2))
    out = tmp_path / "archive"
    out.mkdir()
    (out / "manifest.csv").write_text(",".join(FIELDS_04) + "\n")  # a wsi-idf 0.4 manifest is ours
    assert batch_main([str(folder), "-o", str(out), "--scheduler", cluster["address"], "-q", "--verify"]) == 0
    rows = {Path(r["slide"]).name: r for r in json.loads((out / "manifest.json").read_text())}
    ndpi, tif = rows[NDPI_DAPI.name], rows["lossless.tif"]
    assert ndpi["source_sha256"] == hashlib.sha256(NDPI_DAPI.read_bytes()).hexdigest()
    assert (ndpi["restorable"], ndpi["verified"], ndpi["level_storage"]) == ("yes", "restored", "source;" * 3 + "source")
    assert (tif["restorable"], tif["verified"]) == ("no", "pixels")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the temporary restore is gone
    header = (out / "manifest.csv").read_text().splitlines()[0]
    assert header.endswith("source_sha256,restorable,verified,model,adapted,seconds,error")
    assert tif["model"].startswith("fast-") and tif["adapted"] == ""


def test_a_dicom_series_folder_is_one_slide_of_the_batch(tmp_path, cluster, capsys):
    """A folder holding one DICOM series is one slide (restored as a folder); DICOM files of several
    series side by side stay one slide each."""
    import shutil
    from pipelines.archive_batch import find_slides
    from slides import SLIDES
    lab = tmp_path / "lab"
    shutil.copytree(SLIDES / "dicom" / "boxes", lab / "case-7")
    shutil.copyfile(SLIDES / "dicom" / "camelyon-multiframe.dcm", lab / "camelyon.dcm")
    shutil.copyfile(SLIDES / "dicom" / "sm_image.dcm", lab / "sm.dcm")
    assert find_slides(lab) == [lab / "camelyon.dcm", lab / "case-7", lab / "sm.dcm"]
    assert find_slides(lab, recursive=True) == [lab / "camelyon.dcm", lab / "case-7", lab / "sm.dcm"]
    out = tmp_path / "archive"
    assert batch_main([str(lab), "-o", str(out), "--scheduler", cluster["address"], "-q", "--verify"]) == 0
    rows = {Path(r["slide"]).name: r for r in json.loads((out / "manifest.json").read_text())}
    assert rows["case-7"]["verified"] == "restored" and rows["camelyon.dcm"]["verified"] == "restored"
    assert batch_main([str(lab), "-o", str(out), "--scheduler", cluster["address"], "-q"]) == 0  # finished: skipped
