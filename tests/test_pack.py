"""Packing real slides into archives on a real Dask cluster; reading them back every way a lab would."""
from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import zarr

from conftest import NO_DATA
from slides import CMU_SVS, TCGA_SVS, mosaic, pyramid, write_pyramidal_tiff
from wsi_idf import open_archive
from wsi_idf.cli import main
from wsi_idf.errors import ArchiveError
from wsi_idf.jobs.pack import RECORDS_DIR, pack_slide, partial_path
from wsi_idf.slide import open_slide

pytestmark = pytest.mark.skipif(not CMU_SVS.exists(), reason=NO_DATA)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scheduler():
    """A real local Dask cluster: two worker processes, as on a lab's workstation."""
    from distributed import LocalCluster
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pack")


@pytest.fixture(scope="module")
def cmu_archive(work, scheduler) -> Path:
    out = work / "cmu.zarr"
    summary = pack_slide(CMU_SVS, out, scheduler=scheduler, codec="idf")  # the learned codec on a real slide
    assert summary["levels"] == 1 and summary["raw_bytes"] == 2220 * 2967 * 3
    return out


@pytest.fixture(scope="module")
def tcga_archive(work, scheduler) -> Path:
    out = work / "tcga.zarr"
    pack_slide(TCGA_SVS, out, scheduler=scheduler)
    return out


@pytest.fixture(scope="module")
def pyramid_slide(work) -> tuple[Path, list[np.ndarray]]:
    """Three odd-sized levels (1000x1360, 500x680, 250x340) of real tissue in a generic tiled TIFF."""
    levels = pyramid(mosaic(1000, 1360, seed=7), 3)
    return write_pyramidal_tiff(work / "mosaic.tif", levels), levels


@pytest.fixture(scope="module")
def pyramid_archive(work, pyramid_slide) -> Path:
    out = work / "mosaic.zarr"
    pack_slide(pyramid_slide[0], out, shard=320, scheduler="synchronous")
    return out


def regions(width: int, height: int, seed: int, count: int = 8):
    rng = np.random.default_rng(seed)
    yield from [(0, 0, 80, 80), (width - 81, height - 7, 81, 7), (0, height - 100, 333, 100), (width - 1, 0, 1, 90)]
    for _ in range(count):
        w, h = int(rng.integers(1, 500)), int(rng.integers(1, 500))
        yield int(rng.integers(0, width - w)), int(rng.integers(0, height - h)), w, h


def test_cmu_regions_equal_tifffile_and_openslide_pixels(cmu_archive):
    archive = open_archive(cmu_archive)
    level0 = archive.levels[0]
    assert level0.shape == (3, 2967, 2220) and level0.dtype == np.uint8
    via_tifffile, via_openslide = open_slide(CMU_SVS, "tifffile"), open_slide(CMU_SVS, "openslide")
    for x, y, w, h in regions(2220, 2967, seed=1):
        got = archive.region(0, x, y, w, h)
        assert np.array_equal(got, via_tifffile.read(0, y, y + h, x, x + w)), (x, y, w, h)
        assert np.array_equal(got, via_openslide.read(0, y, y + h, x, x + w)), (x, y, w, h)
    assert np.array_equal(level0[:, 100:180, 2000:].compute().transpose(1, 2, 0), via_tifffile.read(0, 100, 180, 2000, 2220))


def test_archive_is_ome_zarr_with_provenance(cmu_archive):
    root = json.loads((cmu_archive / "zarr.json").read_text())
    ome = root["attributes"]["ome"]
    assert ome["version"] == "0.5"
    ms = ome["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["c", "y", "x"] and ms["axes"][2]["unit"] == "micrometer"
    assert ms["datasets"] == [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 0.499, 0.499]}]}]
    level = json.loads((cmu_archive / "0" / "zarr.json").read_text())
    assert level["shape"] == [3, 2967, 2220] and level["dimension_names"] == ["c", "y", "x"]
    sharding = level["codecs"][0]
    assert sharding["name"] == "sharding_indexed" and sharding["configuration"]["chunk_shape"] == [3, 80, 80]
    assert sharding["configuration"]["codecs"][0]["name"] == "wsi_idf"
    meta = root["attributes"]["wsi_idf"]
    assert meta["source"]["sha256"] == hashlib.sha256(CMU_SVS.read_bytes()).hexdigest()
    assert meta["source"]["size"] == CMU_SVS.stat().st_size and meta["source"]["name"] == CMU_SVS.name
    assert meta["source"]["decoder"]["reader"].startswith("tifffile") and "pixel_decoder" in meta["source"]["decoder"]
    assert meta["model"]["name"] == "fast" and len(meta["model"]["weights"]) == 64 and meta["wsi_idf_version"]
    assert meta["slide"]["properties"]["aperio.AppMag"] == "20" and meta["slide"]["objective_power"] == 20
    assert meta["levels"][0]["checksum"]["value"] and meta["associated"] == ["label", "macro", "thumbnail"]
    assert not (cmu_archive / RECORDS_DIR).exists() and not partial_path(cmu_archive).exists()


def test_associated_images_and_preview_need_no_codec(cmu_archive):
    slide, archive = open_slide(CMU_SVS), open_archive(cmu_archive)
    for name in ["label", "macro", "thumbnail"]:
        assert np.array_equal(archive.associated(name), slide.associated(name))
        codecs = json.loads((cmu_archive / "associated" / name / "zarr.json").read_text())["codecs"]
        assert {c["name"] for c in codecs} == {"bytes", "zstd"}
    preview = zarr.open_group(cmu_archive / "preview", mode="r")
    datasets = preview.attrs["ome"]["multiscales"][0]["datasets"]
    first = preview[datasets[0]["path"]]
    assert max(first.shape[1:]) <= 1024 and first.shape[0] == 3 and len(datasets) >= 2
    assert max(first.shape[1:]) <= 2967 // 8  # a small fraction of level 0, whatever the slide's size
    from wsi_idf.archive.metadata import tree_size
    assert tree_size(cmu_archive / "preview") < 0.05 * tree_size(cmu_archive / "0")
    thumb = first[...].astype(int).mean(axis=(1, 2))
    assert np.allclose(thumb, slide.read(0, 0, 2967, 0, 2220).reshape(-1, 3).mean(axis=0), atol=2)


def test_plain_zarr_in_a_subprocess_without_importing_wsi_idf(cmu_archive, tmp_path):
    expected = open_slide(CMU_SVS).read(0, 2900, 2967, 2150, 2220)  # the bottom-right corner
    np.save(tmp_path / "expected.npy", expected)
    script = textwrap.dedent(f"""
        import numpy as np, zarr
        group = zarr.open_group({str(cmu_archive)!r}, mode="r")
        region = group["0"][:, 2900:2967, 2150:2220]
        assert np.array_equal(region.transpose(1, 2, 0), np.load({str(tmp_path / 'expected.npy')!r}))
        print("ok", group.attrs["ome"]["multiscales"][0]["datasets"][0]["path"])
    """)
    assert "wsi_idf" not in script
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok 0"


def test_verify_against_the_source_on_the_cluster(cmu_archive, scheduler, capsys):
    for backend in ["tifffile", "openslide"]:
        assert main(["verify", str(cmu_archive), "--source", str(CMU_SVS), "--backend", backend,
                     "--scheduler", scheduler, "--json", "-q"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["ok"] and summary["source_compared"] and summary["pixels"] == 2220 * 2967


def test_jp2k_svs_two_levels_icc_profile(tcga_archive, scheduler):
    archive = open_archive(tcga_archive)
    slide = open_slide(TCGA_SVS)
    assert [lv.shape for lv in archive.levels] == [(3, 3567, 4443), (3, 1783, 2221)]
    for level in (0, 1):
        lv = slide.levels[level]
        for x, y, w, h in regions(lv.width, lv.height, seed=level, count=4):
            assert np.array_equal(archive.region(level, x, y, w, h), slide.read(level, y, y + h, x, x + w))
    assert archive.metadata["slide"]["icc_profile"] and archive.mpp is None
    scales = archive.attributes["ome"]["multiscales"][0]["datasets"][1]["coordinateTransformations"][0]["scale"]
    assert scales[1] == pytest.approx(2.0005, abs=1e-4)  # no MPP: the scale is in level-0 pixels
    assert "unit" not in archive.attributes["ome"]["multiscales"][0]["axes"][1]
    summary = json.loads(subprocess.run([sys.executable, "-m", "wsi_idf.cli", "verify", str(tcga_archive),
                                         "--scheduler", scheduler, "--json", "-q"], capture_output=True,
                                        text=True, timeout=600, cwd=REPO).stdout)
    assert summary["ok"] and summary["levels"] == 2


def test_pyramid_levels_and_unpack_to_a_pyramidal_tiff(pyramid_slide, pyramid_archive, work):
    _, levels = pyramid_slide
    archive = open_archive(pyramid_archive)
    assert [a.shape[1:] for a in archive.levels] == [lv.shape[:2] for lv in levels]
    for level, image in enumerate(levels):
        assert np.array_equal(archive.levels[level].compute().transpose(1, 2, 0), image)
    ds = archive.attributes["ome"]["multiscales"][0]["datasets"]
    assert [d["coordinateTransformations"][0]["scale"][2] for d in ds] == [0.25, 0.5, 1.0]
    out = work / "mosaic-unpacked.tif"
    assert main(["unpack", str(pyramid_archive), "-o", str(out), "-q"]) == 0
    with tifffile.TiffFile(out) as tif:
        assert len(tif.series[0].levels) == 3
        for level, image in enumerate(levels):
            assert np.array_equal(tif.series[0].levels[level].asarray(), image)
    with openslide.OpenSlide(str(out)) as slide:  # every level, not only level 0
        assert slide.level_count == 3
        for level, image in enumerate(levels):
            rgba = np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]))
            assert np.array_equal(rgba[..., :3], image) and (rgba[..., 3] == 255).all()
    assert main(["unpack", str(pyramid_archive), "-o", str(out), "-q"]) == 1  # exists: refused


def test_unpack_keeps_mpp_and_associated_images(cmu_archive, work):
    out = work / "cmu.tif"
    assert main(["unpack", str(cmu_archive), "-o", str(out), "-q"]) == 0
    with openslide.OpenSlide(str(out)) as slide:
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.499, abs=1e-4)
    source = open_slide(CMU_SVS)
    with tifffile.TiffFile(out) as tif:
        images = {s.pages[0].description: s.asarray() for s in tif.series[1:]}
        assert sorted(images) == ["label", "macro", "thumbnail"]
        for name, image in images.items():
            assert np.array_equal(image, source.associated(name))


def test_zarr_format_2(pyramid_slide, work):
    out = work / "mosaic-v2.zarr"
    pack_slide(pyramid_slide[0], out, zarr_format=2, workers=1)  # the embedded local cluster
    attrs = json.loads((out / ".zattrs").read_text())
    assert attrs["multiscales"][0]["version"] == "0.4" and attrs["wsi_idf"]["levels"][2]["width"] == 340
    group = zarr.open_group(out, mode="r", zarr_format=2)
    for level, image in enumerate(pyramid_slide[1]):
        assert np.array_equal(group[str(level)][...].transpose(1, 2, 0), image)
    assert json.loads((out / "0" / ".zarray").read_text())["compressor"]["id"] == "wsi_idf"
    assert main(["verify", str(out), "--source", str(pyramid_slide[0]), "--scheduler", "synchronous", "-q"]) == 0


def test_existing_output_is_refused_unless_overwrite(pyramid_slide, pyramid_archive, capsys):
    before = sorted(p.name for p in pyramid_archive.iterdir())
    assert main(["pack", str(pyramid_slide[0]), "-o", str(pyramid_archive), "--scheduler", "synchronous"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in pyramid_archive.iterdir()) == before


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_interrupted_pack_resumes_to_an_identical_archive(pyramid_slide, work, capsys):
    source = pyramid_slide[0]
    whole = work / "whole.zarr"
    pack_slide(source, whole, shard=160, scheduler="synchronous")
    out = work / "resumed.zarr"
    cmd = [sys.executable, "-m", "wsi_idf.cli", "pack", str(source), "-o", str(out), "--shard", "160",
           "--scheduler", "synchronous", "-q"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    records = partial_path(out) / RECORDS_DIR / "0"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(list(records.glob("*.json"))) < 4:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    assert not out.exists() and partial_path(out).exists()
    done = len(list(records.glob("*.json")))
    assert 4 <= done < 7 * 9
    assert main(["pack", str(source), "-o", str(out), "--shard", "160", "--scheduler", "synchronous", "-q"]) == 1
    assert main(["pack", str(source), "-o", str(out), "--shard", "320", "--resume", "--scheduler",
                 "synchronous", "-q"]) == 1  # other settings: refused, nothing lost
    assert partial_path(out).exists()
    capsys.readouterr()
    reused = len(list((partial_path(out) / RECORDS_DIR).rglob("*.json")))
    assert main(["pack", str(source), "-o", str(out), "--shard", "160", "--resume", "--scheduler",
                 "synchronous"]) == 0
    assert f"resumed: {reused} of " in capsys.readouterr().out
    assert not partial_path(out).exists() and snapshot(out) == snapshot(whole)


BAD_NAMES = ["notes.svs", "truncated.svs", "gray.tif", "sixteen.tif", "rgba.tif", "folder.svs",
             "missing.svs", "truncated.dcm", "sparse.dcm"]


@pytest.fixture(scope="module")
def bad_dir(work) -> Path:
    d = work / "bad"
    d.mkdir()
    base = mosaic(300, 300, seed=2)
    (d / "notes.svs").write_text("not a slide\n" * 40)
    (d / "truncated.svs").write_bytes(CMU_SVS.read_bytes()[:900_000])
    tifffile.imwrite(d / "gray.tif", base[..., 0], tile=(256, 256))
    tifffile.imwrite(d / "sixteen.tif", base.astype(np.uint16), tile=(256, 256), photometric="rgb")
    tifffile.imwrite(d / "rgba.tif", np.dstack([base, base[..., :1]]), tile=(256, 256), photometric="rgb",
                     extrasamples=[2])
    (d / "folder.svs").mkdir()
    dicom = CMU_SVS.parent / "dicom" / "camelyon-multiframe.dcm"
    (d / "truncated.dcm").write_bytes(dicom.read_bytes()[:70_000])
    import pydicom
    ds = pydicom.dcmread(dicom)
    ds.DimensionOrganizationType = "TILED_SPARSE"
    ds.save_as(d / "sparse.dcm")
    return d


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_input_exits_1_with_one_line_and_leaves_nothing(bad_dir, name, capsys):
    out = bad_dir / f"{name}.zarr"
    assert main(["pack", str(bad_dir / name), "-o", str(out), "--scheduler", "synchronous"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("wsi-idf: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists() and not partial_path(out).exists()


def test_corrupted_chunk_is_reported_never_decoded_silently(cmu_archive, work, capsys):
    damaged = work / "damaged.zarr"
    shutil.copytree(cmu_archive, damaged)
    shard = damaged / "0" / "c" / "0" / "1" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x10  # inside one patch's bytes
    shard.write_bytes(bytes(data))
    assert main(["verify", str(damaged), "--scheduler", "synchronous", "-q"]) == 3
    err = capsys.readouterr().err
    assert "verification failed" in err and "shard 0/1.0" in err
    with pytest.raises(Exception, match="damaged|checksum"):
        zarr.open_group(damaged, mode="r")["0"][:, 1280:2560, 0:1280]


def test_info_region_and_lossy_source_note(cmu_archive, work, capsys):
    assert main(["info", str(cmu_archive), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["levels"][0]["width"] == 2220 and info["mpp"] == [0.499, 0.499] and info["source"]["name"] == CMU_SVS.name
    assert main(["info", str(cmu_archive)]) == 0
    assert "level 0   2220 x 2967" in capsys.readouterr().out
    out = work / "region.png"
    assert main(["region", str(cmu_archive), "--level", "0", "--x", "2100", "--y", "2900", "--width", "120",
                 "--height", "67", "-o", str(out), "-q"]) == 0
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(out)), open_slide(CMU_SVS).read(0, 2900, 2967, 2100, 2220))
    assert main(["region", str(cmu_archive), "--x", "2200", "--y", "0", "--width", "100", "--height", "10",
                 "-o", str(work / "outside.png")]) == 1
    err = capsys.readouterr().err
    assert "outside level 0" in err and "OpenSlide would pad" in err
    assert main(["info", str(work / "nothing.zarr")]) == 1


def test_cli_pack_drops_the_label_and_says_when_the_source_was_lossy(work, capsys):
    out = work / "cmu-nolabel.zarr"
    assert main(["pack", str(CMU_SVS), "-o", str(out), "--drop-label", "--scheduler", "synchronous",
                 "--codec", "idf"]) == 0
    text = capsys.readouterr().out
    assert "larger than the source file because the source is stored lossily" in text
    assert "x smaller than the raw pixels" in text and "x the size of the source file" in text
    assert "lossily compressed" in text and "smaller than raw" not in text
    assert main(["info", str(out)]) == 0
    assert "x the size of the source file (1.9 MB, lossily compressed)" in capsys.readouterr().out
    archive = open_archive(out)
    assert archive.metadata["associated"] == ["macro", "thumbnail"] and archive.metadata["label_dropped"]
    assert not (out / "associated" / "label").exists()
    assert not any(k.startswith("openslide.associated.label") for k in archive.metadata["slide"]["properties"])


def test_open_archive_refuses_what_is_not_an_archive(work, pyramid_slide):
    with pytest.raises(ArchiveError, match="no such archive"):
        open_archive(work / "absent.zarr")
    (work / "plain.zarr").mkdir()
    with pytest.raises(ArchiveError, match="not a wsi-idf archive"):
        open_archive(work / "plain.zarr")


def test_ome_tiff_source_and_unwritable_output(work, capsys):
    from slides import write_ome_tiff
    levels = pyramid(mosaic(420, 650, seed=9), 2)
    source = write_ome_tiff(work / "small.ome.tif", levels, mpp=0.25)
    out = work / "small-ome.zarr"
    assert main(["pack", str(source), "-o", str(out), "--scheduler", "synchronous", "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["levels"] == 2
    archive = open_archive(out)
    assert archive.mpp == (0.25, 0.25)
    for level, image in enumerate(levels):
        assert np.array_equal(archive.levels[level].compute().transpose(1, 2, 0), image)
    blocked = work / "a-file"
    blocked.write_text("")
    assert main(["pack", str(source), "-o", str(blocked / "x.zarr"), "--scheduler", "synchronous"]) == 1
    assert "cannot write the archive" in capsys.readouterr().err
