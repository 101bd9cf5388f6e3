"""DICOM WSI (issue 22): real Camelyon JPEG frames kept and restorable; lossless frames (uncompressed, JPEG-LS,
in files built here from real tissue) coded with the IDF; what is not supported refused with one line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import NO_DATA
from slides import SLIDES, mosaic
from wsi_idf import open_archive
from wsi_idf.cli import main
from wsi_idf.errors import SlideError
from wsi_idf.slide import open_slide

CAMELYON = SLIDES / "dicom" / "camelyon-multiframe.dcm"
SYNTHETIC = SLIDES / "dicom" / "sm_image.dcm"  # highdicom's 50x50 test file: the attributes we reuse

pytestmark = pytest.mark.skipif(not CAMELYON.exists(), reason=NO_DATA)


def pack(capsys, slide: Path, out: Path, *extra: str) -> dict:
    assert main(["pack", str(slide), "-o", str(out), "--scheduler", "synchronous", "-q", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def write_dicom(path: Path, image: np.ndarray, tile: int, syntax: str) -> Path:
    """A TILED_FULL DICOM WSI of ``image`` (real tissue) in ``tile`` frames: uncompressed, JPEG-LS or RLE lossless."""
    import imagecodecs
    import pydicom
    from pydicom.encaps import encapsulate
    ds = pydicom.dcmread(SYNTHETIC)
    h, w, _ = image.shape
    down, across = -(-h // tile), -(-w // tile)
    padded = np.zeros((down * tile, across * tile, 3), np.uint8)
    padded[:h, :w] = image
    frames = [np.ascontiguousarray(padded[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile])
              for r in range(down) for c in range(across)]
    ds.Rows = ds.Columns = tile
    ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns = h, w
    ds.NumberOfFrames = len(frames)
    if syntax == "native":
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.PixelData = b"".join(f.tobytes() for f in frames)
    elif syntax == "rle":  # pydicom's own RLE Lossless encoder
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.PixelData = b"".join(f.tobytes() for f in frames)
        ds.compress(pydicom.uid.RLELossless, encoding_plugin="pydicom")
    else:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLSLossless
        ds.PixelData = encapsulate([imagecodecs.jpegls_encode(f) for f in frames])
        ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_camelyon_keeps_its_jpeg_frames_equal_to_openslide_and_restores(tmp_path, capsys):
    import openslide
    summary = pack(capsys, CAMELYON, tmp_path / "c.zarr")
    assert summary["storage"] == [{"storage": "source", "source_codec": "jpeg"}] and summary["restorable"]
    print(f"Camelyon DICOM: {summary['archive_bytes'] / summary['source_bytes']:.3f}x the source")
    assert summary["archive_bytes"] <= summary["source_bytes"]
    with openslide.OpenSlide(str(CAMELYON)) as osl:
        expected = np.asarray(osl.read_region((0, 0), 0, osl.dimensions))[..., :3]
    archive = open_archive(tmp_path / "c.zarr")
    assert np.array_equal(archive.region(0, 0, 0, 1152, 700), expected)
    meta = archive.metadata
    assert meta["source"]["backend"] == "dicom" and meta["slide"]["mpp"] == pytest.approx([28.969, 28.968], abs=1e-3)
    assert meta["slide"]["properties"]["dicom.DimensionOrganizationType"] == "TILED_FULL"
    assert main(["verify", str(tmp_path / "c.zarr"), "--source", str(CAMELYON), "--backend", "openslide",
                 "--scheduler", "synchronous", "-q"]) == 0
    assert main(["restore", str(tmp_path / "c.zarr"), "-o", str(tmp_path / "c.dcm"), "-q"]) == 0
    assert (tmp_path / "c.dcm").read_bytes() == CAMELYON.read_bytes()


@pytest.mark.parametrize("syntax", ["native", "jpegls", "rle"])
def test_lossless_dicom_frames_are_coded_with_the_idf(tmp_path, capsys, syntax):
    image = mosaic(230, 310, seed=11)
    slide = write_dicom(tmp_path / f"{syntax}.dcm", image, 128, syntax)
    with open_slide(slide) as opened:
        assert np.array_equal(opened.read(0, 0, 230, 0, 310), image)
    summary = pack(capsys, slide, tmp_path / f"{syntax}.zarr", "--restorable")
    assert summary["storage"] == [{"storage": "idf", "source_codec": None}] and summary["restorable"]
    assert np.array_equal(open_archive(tmp_path / f"{syntax}.zarr").region(0, 0, 0, 310, 230), image)
    assert main(["restore", str(tmp_path / f"{syntax}.zarr"), "-o", str(tmp_path / "back.dcm"), "-q"]) == 0
    assert (tmp_path / "back.dcm").read_bytes() == slide.read_bytes()


@pytest.mark.parametrize("name", ["sm_image.dcm", "sm_image_jpegls.dcm", "boxes/boxes_0.dcm"])
def test_small_synthetic_dicom_files_archive_and_restore(tmp_path, capsys, name):
    """highdicom's 50x50 files (uncompressed, JPEG-LS) and OpenSlide's 16x16 JPEG volume: smaller than a
    patch, coded as one padded patch (or kept); pixels equal to the file's, the file itself restored."""
    slide = SLIDES / "dicom" / name
    summary = pack(capsys, slide, tmp_path / "s.zarr", "--restorable")
    assert summary["restorable"]
    assert main(["verify", str(tmp_path / "s.zarr"), "--source", str(slide), "--scheduler", "synchronous", "-q"]) == 0
    if "jpegls" not in name:  # OpenSlide 4 reads no JPEG-LS
        assert main(["verify", str(tmp_path / "s.zarr"), "--source", str(slide), "--backend", "openslide",
                     "--scheduler", "synchronous", "-q"]) == 0
    assert main(["restore", str(tmp_path / "s.zarr"), "-o", str(tmp_path / "s.dcm"), "-q"]) == 0
    assert (tmp_path / "s.dcm").read_bytes() == slide.read_bytes()


def test_unsupported_and_damaged_dicom_get_one_line(tmp_path, capsys):
    truncated = tmp_path / "cut.dcm"
    truncated.write_bytes(CAMELYON.read_bytes()[:60_000])
    assert main(["pack", str(truncated), "-o", str(tmp_path / "cut.zarr"), "--scheduler", "synchronous"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "truncated" in err and not (tmp_path / "cut.zarr").exists()
    import pydicom
    ds = pydicom.dcmread(CAMELYON)
    ds.DimensionOrganizationType = "TILED_SPARSE"
    ds.save_as(tmp_path / "sparse.dcm")
    with pytest.raises(SlideError, match="TILED_SPARSE"):
        open_slide(tmp_path / "sparse.dcm")
    ds = pydicom.dcmread(CAMELYON)
    ds.ConcatenationUID = "1.2.3"
    ds.save_as(tmp_path / "concatenated.dcm")
    with pytest.raises(SlideError, match="concatenation"):
        open_slide(tmp_path / "concatenated.dcm")
    ds = pydicom.dcmread(CAMELYON)
    ds.NumberOfFrames = 14  # a frame missing
    ds.save_as(tmp_path / "missing.dcm")
    with pytest.raises(SlideError, match="frames"):
        open_slide(tmp_path / "missing.dcm")


def test_a_dicom_series_folder_is_one_slide_and_restores_file_by_file(tmp_path, capsys):
    """OpenSlide's two-instance DICOM (a JPEG volume and an uncompressed THUMBNAIL): the folder is the
    slide, the thumbnail an associated image equal to OpenSlide's, and restore gives the folder back."""
    import openslide
    folder = SLIDES / "dicom" / "boxes"
    summary = pack(capsys, folder, tmp_path / "boxes.zarr", "--restorable")
    assert summary["levels"] == 1 and summary["restorable"]
    archive = open_archive(tmp_path / "boxes.zarr")
    assert archive.metadata["associated"] == ["thumbnail"]
    with openslide.OpenSlide(str(folder / "boxes_0.dcm")) as osl:
        assert np.array_equal(archive.associated("thumbnail"), np.asarray(osl.associated_images["thumbnail"].convert("RGB")))
        assert np.array_equal(archive.region(0, 0, 0, 16, 16), np.asarray(osl.read_region((0, 0), 0, (16, 16)))[..., :3])
    out = tmp_path / "restored"
    assert main(["restore", str(tmp_path / "boxes.zarr"), "-o", str(out), "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["boxes_0.dcm", "boxes_1.dcm"]
    assert all((out / p.name).read_bytes() == p.read_bytes() for p in folder.iterdir())
    assert main(["restore", str(tmp_path / "boxes.zarr"), "-o", str(out), "--overwrite", "-q"]) == 0  # same bytes
    (out / "boxes_1.dcm").write_bytes(b"changed")
    assert main(["restore", str(tmp_path / "boxes.zarr"), "-o", str(out), "--overwrite"]) == 1  # not the same: kept
    assert (out / "boxes_1.dcm").read_bytes() == b"changed"


def test_a_series_folder_with_a_duplicate_level_is_refused(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    for name in ("a.dcm", "b.dcm"):
        shutil.copyfile(SLIDES / "dicom" / "boxes" / "boxes_0.dcm", folder / name)
    with pytest.raises(SlideError, match="two VOLUME instances of the same size"):
        open_slide(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no slide here")
    with pytest.raises(SlideError, match="is a folder"):
        open_slide(empty)
