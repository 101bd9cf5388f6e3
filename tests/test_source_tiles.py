"""Lossy-compressed slides (issue 15): levels keep the source's own tiles, pixel-exact, smaller than the file."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import NO_DATA
from slides import CMU_SVS, TCGA_SVS, mosaic, pyramid, write_pyramidal_tiff
from wsi_idf import open_archive
from wsi_idf.coding import patch_format as fmt
from wsi_idf.storage import source_tiles
from wsi_idf.cli import main
from wsi_idf.errors import CorruptPatchError, VerificationError
from wsi_idf.archive.metadata import tree_size
from wsi_idf.slide import open_slide
from wsi_idf.jobs.verify import verify_archive

pytestmark = pytest.mark.skipif(not CMU_SVS.exists(), reason=NO_DATA)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("source")


def pack_cli(capsys, slide: Path, out: Path, *extra: str) -> dict:
    assert main(["pack", str(slide), "-o", str(out), "--scheduler", "synchronous", "-q", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def cmu(work) -> Path:
    out = work / "cmu.zarr"
    assert main(["pack", str(CMU_SVS), "-o", str(out), "--scheduler", "synchronous", "-q"]) == 0
    return out


def test_cmu_jpeg_svs_archive_is_smaller_than_its_file_and_pixel_exact(cmu, capsys):
    archive = open_archive(cmu)
    level = archive.metadata["levels"][0]
    assert level["storage"] == "source" and level["source_codec"] == "jpeg" and level["chunk"] == 240
    size = tree_size(cmu)  # levels, preview, associated images: all of it
    print(f"CMU: archive {size} bytes, source {CMU_SVS.stat().st_size}, {size / CMU_SVS.stat().st_size:.3f}x")
    assert size <= 0.85 * CMU_SVS.stat().st_size
    for backend in ("tifffile", "openslide"):  # every pixel, against both readers
        assert main(["verify", str(cmu), "--source", str(CMU_SVS), "--backend", backend, "--scheduler",
                     "synchronous", "-q"]) == 0
    slide = open_slide(CMU_SVS)
    for name in ("label", "macro", "thumbnail"):  # kept too: JPEG strips as JPEG XL, the LZW label as lossless JPEG XL
        assert np.array_equal(archive.associated(name), slide.associated(name)), name
    assert main(["info", str(cmu)]) == 0
    assert "source (JPEG tiles, recompressed with JPEG XL)" in capsys.readouterr().out


def test_every_kept_chunk_is_jpeg_xl_and_the_pixels_are_tifffiles(cmu):
    """The pixels come from libjpeg-turbo decoding the rebuilt JPEG, as tifffile decodes the tile."""
    import tifffile
    reference = tifffile.imread(CMU_SVS)
    shard = cmu / "0" / "c" / "0" / "1" / "1"
    data = shard.read_bytes()
    index = np.frombuffer(data[-(16 * 25 + 4):-4], dtype="<u8").reshape(-1, 2)
    offset, nbytes = (int(v) for v in index[0])
    blob = data[offset:offset + nbytes]
    header, payload = fmt.unpack(blob)
    assert header.mode == fmt.Mode.SOURCE and payload[0] == source_tiles.Kind.JPEG_AS_JPEGXL
    row, col = int(shard.parts[-2]) * 5, int(shard.parts[-1]) * 5
    with pytest.raises(CorruptPatchError, match="not given the archive's id"):  # patch format 4: bound to its archive
        source_tiles.decode_chunk(blob, (3, 240, 240), (0, row, col), check_position=True)
    archive_id = bytes.fromhex(open_archive(cmu).metadata["archive_id"])
    tile = source_tiles.decode_chunk(blob, (3, 240, 240), (0, row, col), check_position=True, archive_id=archive_id)
    expected = reference[row * 240:(row + 1) * 240, col * 240:(col + 1) * 240]
    assert np.array_equal(tile.transpose(1, 2, 0)[:expected.shape[0], :expected.shape[1]], expected)


def test_plain_zarr_reads_source_levels_in_a_subprocess(cmu, tmp_path):
    expected = open_slide(CMU_SVS).read(0, 0, 2967, 0, 2220)
    np.save(tmp_path / "expected.npy", expected)
    code = f"""
import numpy as np, zarr
level = zarr.open_group({str(cmu)!r}, mode="r")["0"]
expected = np.load({str(tmp_path / 'expected.npy')!r})
assert (level[...].transpose(1, 2, 0) == expected).all()
assert (level[:, 2900:2967, 2150:2220].transpose(1, 2, 0) == expected[2900:, 2150:]).all()
label = zarr.open_group({str(cmu)!r}, mode="r")["associated/label"][...]
import sys
assert "torch" not in sys.modules, "kept tiles need no network: a first read must not pay for importing torch"
print("ok", label.shape)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.startswith("ok"), result.stderr[-2000:]


def test_region_and_unpack_of_a_source_archive(cmu, tmp_path, capsys):
    import tifffile
    out = tmp_path / "r.png"
    assert main(["region", str(cmu), "--x", "1000", "--y", "2000", "--width", "700", "--height", "500",
                 "-o", str(out), "-q"]) == 0
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(out)), open_slide(CMU_SVS).read(0, 2000, 2500, 1000, 1700))
    # kept tiles have no flow levels: a "preview" of them is exact
    assert np.array_equal(open_archive(cmu).region(0, 5, 6, 300, 200, flow_levels=1),
                          open_slide(CMU_SVS).read(0, 6, 206, 5, 305))
    assert main(["unpack", str(cmu), "-o", str(tmp_path / "u.tif"), "-q"]) == 0
    assert np.array_equal(tifffile.imread(tmp_path / "u.tif"), open_slide(CMU_SVS).read(0, 0, 2967, 0, 2220))


def test_damaged_source_chunk_raises_everywhere(cmu, tmp_path):
    damaged = Path(shutil.copytree(cmu, tmp_path / "damaged.zarr"))
    shard = damaged / "0" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    offset, nbytes = (int(v) for v in np.frombuffer(bytes(data[-(16 * 25 + 4):-4]), dtype="<u8")[:2])
    data[offset + nbytes // 2] ^= 0x08  # inside the first kept tile's JPEG XL bytes
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptPatchError, match="tile x=0, y=0 is damaged"):
        open_archive(damaged).region(0, 0, 0, 100, 100)
    with pytest.raises(Exception, match="damaged|checksum"):
        zarr.open_group(damaged, mode="r")["0"][:, :240, :240]
    with pytest.raises(VerificationError) as info:
        verify_archive(damaged, scheduler="synchronous")
    assert info.value.damaged == [[0, 0, 0]]


def test_tcga_jpeg2000_svs_keeps_its_tiles_as_they_are(work, capsys):
    out = work / "tcga.zarr"
    summary = pack_cli(capsys, TCGA_SVS, out)
    assert summary["storage"] == [{"storage": "source", "source_codec": "jpeg2000"}] * 2
    print(f"TCGA: archive {summary['archive_bytes']} bytes, {summary['archive_bytes'] / summary['source_bytes']:.3f}x")
    assert summary["archive_bytes"] <= 1.05 * summary["source_bytes"]
    assert main(["verify", str(out), "--source", str(TCGA_SVS), "--scheduler", "synchronous", "-q"]) == 0
    import openslide  # level 0 against OpenSlide too (its level 1 has a non-integer downsample)
    with openslide.OpenSlide(str(TCGA_SVS)) as osl:
        expected = np.asarray(osl.read_region((1000, 700), 0, (600, 500)).convert("RGB"))
    assert np.array_equal(open_archive(out).region(0, 1000, 700, 600, 500), expected)


def test_lossless_sources_are_still_coded_with_the_idf(work, capsys):
    slide = write_pyramidal_tiff(work / "zlib.tif", pyramid(mosaic(300, 400, seed=71), 2))
    summary = pack_cli(capsys, slide, work / "zlib.zarr")
    assert summary["storage"] == [{"storage": "idf", "source_codec": None}] * 2
    assert main(["pack", str(slide), "-o", str(work / "no.zarr"), "--codec", "source", "--scheduler",
                 "synchronous"]) == 1
    assert "cannot keep its source tiles" in capsys.readouterr().err and not (work / "no.zarr").exists()


def test_codec_idf_codes_a_jpeg_slide_with_the_idf(work, capsys):
    summary = pack_cli(capsys, CMU_SVS, work / "cmu-idf.zarr", "--codec", "idf", "--drop-label")
    assert summary["storage"] == [{"storage": "idf", "source_codec": None}]
    assert summary["archive_bytes"] > CMU_SVS.stat().st_size  # why auto keeps the tiles


def test_a_ycbcr_jpeg_pyramid_keeps_its_tiles_on_a_dask_cluster(work, capsys):
    """tifffile writes JPEG tiles as subsampled YCbCr: the kept tiles decode to tifffile's pixels,
    packed on a real 2-process cluster."""
    from slides import write_mosaic_pyramid
    slide = write_mosaic_pyramid(work / "jpeg.tif", 1500, 1100, levels=2, seed=5)
    out = work / "jpeg.zarr"
    assert main(["pack", str(slide), "-o", str(out), "--workers", "2", "-q", "--json"]) == 0  # embedded cluster
    summary = json.loads(capsys.readouterr().out)
    assert {lv["storage"] for lv in summary["storage"]} == {"source"}
    assert summary["archive_bytes"] < slide.stat().st_size
    assert main(["verify", str(out), "--source", str(slide), "--scheduler", "synchronous", "-q"]) == 0
