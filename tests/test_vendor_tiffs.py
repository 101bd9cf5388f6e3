"""Vendor TIFF flavours built from real tissue (no samples of them exist here): Philips TIFF, Leica SCN,
Ventana BIF and OME-TIFF JPEG pyramids keep every level's tiles, read as tifffile (and OpenSlide) do,
and restore."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from conftest import NO_DATA
from slides import TILE_FOLDER, write_leica_scn, write_ome_jpeg_pyramid, write_philips_tiff, write_ventana_bif
from wsi_idf import open_archive
from wsi_idf.cli import main

pytestmark = pytest.mark.skipif(not TILE_FOLDER.is_dir(), reason=NO_DATA)
WRITERS = {"philips.tiff": write_philips_tiff, "leica.scn": write_leica_scn, "pyramid.ome.tif": write_ome_jpeg_pyramid,
           "ventana.bif": write_ventana_bif}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_vendor_tiffs_keep_their_tiles_and_restore(tmp_path, capsys, name):
    slide = WRITERS[name](tmp_path / name)
    out = tmp_path / "a.zarr"
    assert main(["pack", str(slide), "-o", str(out), "--scheduler", "synchronous", "-q", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {lv["storage"] for lv in summary["storage"]} == {"source"} and summary["levels"] == 3
    assert summary["restorable"] and summary["archive_bytes"] < summary["source_bytes"]
    archive = open_archive(out)
    with tifffile.TiffFile(slide) as tif:  # the slide's own pyramid, whichever series tifffile lists first
        main_series = max(tif.series, key=lambda s: s.levels[0].shape[0] * s.levels[0].shape[1])
        for k, level in enumerate(main_series.levels):
            h, w = level.shape[:2]
            assert np.array_equal(archive.region(k, 0, 0, w, h), level.asarray()), k
    if name == "philips.tiff":  # OpenSlide places an SCN's main image in its collection, sees one OME level
        assert main(["verify", str(out), "--source", str(slide), "--backend", "openslide", "--scheduler",
                     "synchronous", "-q"]) == 0
    assert main(["restore", str(out), "-o", str(tmp_path / f"back-{name}"), "-q"]) == 0
    assert (tmp_path / f"back-{name}").read_bytes() == slide.read_bytes()
    if name in ("philips.tiff", "leica.scn"):
        assert "macro" in archive.metadata["associated"]
    if name == "ventana.bif":
        assert archive.metadata["associated"] == ["label", "thumbnail"]


def test_a_bif_whose_tiles_overlap_is_refused_by_tifffile(tmp_path):
    """tifffile lays BIF tiles side by side; with overlapping tiles that is not the slide: one line, and
    the advice to read it through OpenSlide, which stitches them."""
    from wsi_idf.errors import SlideError
    from wsi_idf.slide import open_slide
    slide = write_ventana_bif(tmp_path / "overlap.bif",
                              joints=b'<TileJointInfo Tile1="1" Tile2="2" OverlapX="9" OverlapY="0"/>')
    with pytest.raises(SlideError, match="tiles overlap.*--backend openslide"):
        open_slide(slide)
