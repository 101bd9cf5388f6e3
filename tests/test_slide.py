"""Slide readers on the real SVS files and on pyramids built from real tiles; bad input refused clearly."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile

from conftest import NO_DATA
from slides import CMU_SVS, DICOM, TCGA_SVS, mosaic, pyramid, write_ome_tiff, write_pyramidal_tiff
from wsi_idf.errors import SlideError
from wsi_idf.slide import cached_slide, composite, level_as_dask, open_slide

pytestmark = pytest.mark.skipif(not CMU_SVS.exists(), reason=NO_DATA)


def random_boxes(width: int, height: int, rng: np.random.Generator, count: int = 6):
    """Regions including the four corners and the right and bottom edges."""
    yield 0, 0, 80, 80
    yield width - 97, height - 33, 97, 33
    yield 0, height - 80, 123, 80
    yield width - 1, 0, 1, min(200, height)
    for _ in range(count):
        w, h = int(rng.integers(1, min(400, width))), int(rng.integers(1, min(400, height)))
        yield int(rng.integers(0, width - w)), int(rng.integers(0, height - h)), w, h


@pytest.mark.parametrize("path", [CMU_SVS, TCGA_SVS], ids=["jpeg-svs", "jp2k-svs"])
def test_tifffile_and_openslide_agree_on_level0(path):
    a, b = open_slide(path, "tifffile"), open_slide(path, "openslide")
    lv = a.levels[0]
    assert (lv.width, lv.height) == (b.levels[0].width, b.levels[0].height)
    for x, y, w, h in random_boxes(lv.width, lv.height, np.random.default_rng(0)):
        assert np.array_equal(a.read(0, y, y + h, x, x + w), b.read(0, y, y + h, x, x + w)), (x, y, w, h)


def test_svs_metadata_and_associated_images():
    cmu = open_slide(CMU_SVS)
    assert cmu.backend == "tifffile" and cmu.info.mpp == (0.499, 0.499) and cmu.info.objective_power == 20
    assert cmu.associated_names() == ["label", "macro", "thumbnail"]
    assert cmu.info.properties["aperio.AppMag"] == "20" and "libjpeg" in cmu.info.decoder["pixel_decoder"]
    assert cmu.associated("label").shape == (463, 387, 3)
    tcga = open_slide(TCGA_SVS)
    assert len(tcga.levels) == 2 and tcga.info.icc_profile and tcga.info.mpp is None
    assert tcga.info.icc_profile == open_slide(TCGA_SVS, "openslide").info.icc_profile


def test_openslide_leaves_out_levels_it_cannot_read_exactly():
    slide = open_slide(TCGA_SVS, "openslide")  # level 1 downsample is 2.0005
    assert len(slide.levels) == 1 and slide.skipped_levels[0]["level"] == 1


def test_generated_pyramids_read_exactly(tmp_path):
    levels = pyramid(mosaic(1000, 1360, seed=3), 3)
    tif = write_pyramidal_tiff(tmp_path / "pyr.tif", levels)
    ome = write_ome_tiff(tmp_path / "pyr.ome.tif", levels)
    rng = np.random.default_rng(1)
    for path, backend, count in [(tif, "tifffile", 3), (tif, "openslide", 3), (ome, "tifffile", 3), (ome, "openslide", 1)]:
        slide = open_slide(path, backend)
        assert len(slide.levels) == count, (path.name, backend)
        for i, lv in enumerate(slide.levels):
            for x, y, w, h in random_boxes(lv.width, lv.height, rng, 2):
                assert np.array_equal(slide.read(i, y, y + h, x, x + w), levels[i][y:y + h, x:x + w])
    assert open_slide(ome).info.mpp == (0.5, 0.5) and open_slide(tif, "openslide").info.mpp == (0.25, 0.25)


def test_level_as_dask_reads_lazily_and_exactly():
    slide = cached_slide(open_slide(CMU_SVS).ref)
    arr = level_as_dask(slide.ref, 0, chunk=700)
    assert arr.shape == (2967, 2220, 3) and arr.numblocks == (5, 4, 1)
    assert np.array_equal(arr[650:760, 2100:].compute(), slide.read(0, 650, 760, 2100, 2220))


def test_composite_puts_transparent_pixels_on_the_background():
    rgba = np.array([[[10, 20, 30, 255], [0, 0, 0, 0], [200, 100, 0, 128]]], dtype=np.uint8)
    out = composite(rgba, (255, 250, 240))
    assert out.tolist() == [[[10, 20, 30], [255, 250, 240], [227, 175, 120]]]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    base = mosaic(300, 300, seed=4)
    tifffile.imwrite(d / "gray.tif", base[..., 0], tile=(256, 256))
    tifffile.imwrite(d / "sixteen.tif", base.astype(np.uint16) * 3, tile=(256, 256), photometric="rgb")
    tifffile.imwrite(d / "rgba.tif", np.dstack([base, np.full(base.shape[:2], 255, np.uint8)]), tile=(256, 256),
                     photometric="rgb", extrasamples=[2])
    data = CMU_SVS.read_bytes()
    (d / "truncated.svs").write_bytes(data[: len(data) // 2])
    (d / "tail-truncated.svs").write_bytes(data[:-200_000])
    (d / "notes.svs").write_text("not a slide\n" * 50)
    (d / "empty.svs").write_bytes(b"")
    (d / "folder.svs").mkdir()
    return d


BAD = {"gray.tif": "8-bit grayscale", "sixteen.tif": "16-bit RGB", "rgba.tif": "8-bit RGBA",
       "truncated.svs": "truncated", "tail-truncated.svs": "truncated",
       "notes.svs": "not a slide format", "empty.svs": "empty file", "folder.svs": "is a folder",
       "missing.svs": "no such file"}


@pytest.mark.parametrize("name", sorted(BAD))
@pytest.mark.parametrize("backend", ["auto", "openslide"])
def test_bad_input_is_refused_with_one_clear_message(bad_inputs, name, backend):
    with pytest.raises(SlideError) as info:
        open_slide(bad_inputs / name, backend)
    assert BAD[name] in str(info.value) and "\n" not in str(info.value)


def test_a_dicom_file_without_image_type_opens_as_its_tiled_full_frames(tmp_path, capsys):
    """pathml's DICOM lacks ImageType and DimensionOrganizationType (OpenSlide refuses it): its 42 frames
    fill the 7x6 grid, so they are read as TILED_FULL, kept, and the file restores byte for byte."""
    from wsi_idf.cli import main
    with open_slide(DICOM) as slide:
        assert slide.levels[0].width == 3236 and slide.source_segments(0).count == 42
    assert main(["pack", str(DICOM), "-o", str(tmp_path / "d.zarr"), "--scheduler", "synchronous", "-q"]) == 0
    assert main(["restore", str(tmp_path / "d.zarr"), "-o", str(tmp_path / "d.dcm"), "-q"]) == 0
    assert (tmp_path / "d.dcm").read_bytes() == DICOM.read_bytes()
