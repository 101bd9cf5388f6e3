"""Other formats' own tiles (NDPI restart intervals) and ``wsi-idf restore``: the source file back, byte for byte."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import NO_DATA
from slides import CMU_SVS, NDPI, NDPI_DAPI, TCGA_SVS, mosaic, pyramid, write_pyramidal_tiff
from wsi_idf.archive.restore import RestoreMismatchError, restore_file
from wsi_idf.cli import main
from wsi_idf.errors import ArchiveError
from wsi_idf.storage.source_tiles import split_intervals, stack_intervals
from wsi_idf.storage.tiff_strips import libtiff_lzw

pytestmark = pytest.mark.skipif(not NDPI_DAPI.exists(), reason=NO_DATA)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pack(capsys, slide: Path, out: Path, *extra: str) -> dict:
    assert main(["pack", str(slide), "-o", str(out), "--scheduler", "synchronous", "-q", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("restore")


@pytest.fixture(scope="module")
def dapi(work) -> Path:
    out = work / "dapi.zarr"
    assert main(["pack", str(NDPI_DAPI), "-o", str(out), "--scheduler", "synchronous", "-q"]) == 0
    return out


@pytest.mark.parametrize("slide", [CMU_SVS, TCGA_SVS, *NDPI], ids=lambda p: p.name)
def test_restore_gives_every_real_slide_back_byte_for_byte(work, capsys, slide):
    out = work / f"{slide.stem}-all.zarr"
    summary = pack(capsys, slide, out)
    assert summary["restorable"] and {lv["storage"] for lv in summary["storage"]} == {"source"}
    print(f"{slide.name}: archive {summary['archive_bytes'] / summary['source_bytes']:.3f}x the source, "
          f"restore data {summary['restore_bytes']} bytes")
    restored = work / f"restored-{slide.name}"
    assert main(["restore", str(out), "-o", str(restored), "-q"]) == 0
    assert restored.read_bytes() == slide.read_bytes()
    assert main(["info", str(out)]) == 0
    assert "restorable: `wsi-idf restore` gives" in capsys.readouterr().out


def test_ndpi_keeps_its_jpeg_and_reads_as_openslide_in_a_fresh_process(dapi, capsys):
    meta = json.loads((dapi / "zarr.json").read_text())["attributes"]["wsi_idf"]
    assert [lv["storage"] for lv in meta["levels"]] == ["source"] * 4
    assert [lv["chunk"] for lv in meta["levels"]] == [3968, 1984, 992, 496]  # 8-row intervals stacked square
    size = sum(p.stat().st_size for p in dapi.rglob("*") if p.is_file())
    assert size <= 0.90 * NDPI_DAPI.stat().st_size, size / NDPI_DAPI.stat().st_size
    code = f"""
import numpy as np, openslide, zarr
group = zarr.open_group({str(dapi)!r}, mode="r")
with openslide.OpenSlide({str(NDPI_DAPI)!r}) as slide:
    for level in range(4):
        w, h = slide.level_dimensions[level]
        expected = np.asarray(slide.read_region((0, 0), level, (w, h)))[..., :3].transpose(2, 0, 1)
        assert np.array_equal(group[str(level)][...], expected), level
    assert np.array_equal(group["0"][:, 1000:1300, 2000:2500],
                          np.asarray(slide.read_region((2000, 1000), 0, (500, 300)))[..., :3].transpose(2, 0, 1))
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
    assert main(["verify", str(dapi), "--source", str(NDPI_DAPI), "--scheduler", "synchronous", "-q"]) == 0


def test_stacked_intervals_give_each_interval_back():
    header = bytes.fromhex("ffd8ffc0000b080008001001011100ffdd00040002ffda0008010100003f00")
    segments = [b"\x12\x34\xff\x00" + bytes([k]) + bytes((0xFF, 0xD0 + i % 8)) for k, i in enumerate(range(8, 11))]
    segments[-1] = segments[-1][:-2] + b"\xff\xd9"  # the scan's last interval ends with EOI
    stream, pieces = stack_intervals(segments, header, 8, [8, 9, 10], 11)
    assert stream[-2:] == b"\xff\xd9" and int.from_bytes(stream[header.index(b"\xff\xc0") + 5:][:2], "big") == 24
    assert [piece.rebuild(stream) for piece in pieces] == segments
    head, intervals = split_intervals(stream)
    assert len(head) == len(header) and [i[-2:] for i in intervals] == [b"\xff\xd0", b"\xff\xd1", b"\xff\xd9"]
    with pytest.raises(ValueError, match="does not end with its marker"):
        stack_intervals(segments, header, 8, [9, 10, 11], 12)


def test_libtiff_lzw_round_trips_through_the_tiff_decoder():
    import imagecodecs
    rng = np.random.default_rng(3)
    for data in (b"", b"a", bytes(rng.integers(0, 4, 9000, dtype=np.uint8)), bytes(rng.integers(0, 256, 9000, dtype=np.uint8))):
        assert imagecodecs.lzw_decode(libtiff_lzw(data)) == data


def test_restore_refuses_to_replace_other_files_and_checks_the_sha256(dapi, work, capsys):
    other = work / "someone-elses.ndpi"
    other.write_bytes(b"not the source")
    assert main(["restore", str(dapi), "-o", str(other)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["restore", str(dapi), "-o", str(other), "--overwrite"]) == 1
    assert "is not this archive's source" in capsys.readouterr().err and other.read_bytes() == b"not the source"
    assert main(["restore", str(dapi), "-o", str(dapi / "inside.ndpi")]) == 1
    copy = work / "copy.ndpi"
    shutil.copyfile(NDPI_DAPI, copy)  # the same bytes (it could be the source itself): accepted, never touched
    before = copy.stat().st_mtime_ns, copy.stat().st_ino
    assert main(["restore", str(dapi), "-o", str(copy), "--overwrite"]) == 0
    assert "already holds" in capsys.readouterr().out and (copy.stat().st_mtime_ns, copy.stat().st_ino) == before

    forged = work / "forged.zarr"
    shutil.copytree(dapi, forged)
    root = json.loads((forged / "zarr.json").read_text())
    root["attributes"]["wsi_idf"]["source"]["sha256"] = "0" * 64
    (forged / "zarr.json").write_text(json.dumps(root))
    restore = json.loads((forged / "restore" / "zarr.json").read_text())
    restore["attributes"]["wsi_idf_restore"]["sha256"] = "0" * 64
    (forged / "restore" / "zarr.json").write_text(json.dumps(restore))
    target = work / "mismatch.ndpi"
    with pytest.raises(RestoreMismatchError):
        restore_file(forged, target)
    assert main(["restore", str(forged), "-o", str(target)]) == 3
    assert not target.exists() and not list(work.glob(".mismatch.ndpi.restoring-*"))


def test_a_damaged_kept_tile_names_itself_and_leaves_nothing(dapi, work, capsys):
    damaged = work / "damaged.zarr"
    shutil.copytree(dapi, damaged)
    shard = damaged / "1" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[4000] ^= 0x40
    shard.write_bytes(bytes(data))
    assert main(["restore", str(damaged), "-o", str(work / "from-damaged.ndpi")]) == 1
    assert "damaged" in capsys.readouterr().err and not (work / "from-damaged.ndpi").exists()


def test_lossless_levels_are_restorable_only_with_restorable(work, capsys):
    slide = write_pyramidal_tiff(work / "zlib.tif", pyramid(mosaic(200, 300, seed=5), 2))
    summary = pack(capsys, slide, work / "zlib.zarr")
    assert not summary["restorable"] and "--restorable" in summary["not_restorable_why"]
    with pytest.raises(ArchiveError, match="cannot give its source file back"):
        restore_file(work / "zlib.zarr", work / "zlib-restored.tif")
    bigger = pack(capsys, slide, work / "zlib-r.zarr", "--restorable")
    assert bigger["restorable"] and bigger["archive_bytes"] > summary["archive_bytes"]
    assert main(["restore", str(work / "zlib-r.zarr"), "-o", str(work / "zlib-restored.tif"), "-q"]) == 0
    assert sha256(work / "zlib-restored.tif") == sha256(slide)


def test_a_source_that_changes_while_packed_is_refused(work, capsys, monkeypatch):
    import wsi_idf.jobs.pack as pack_module
    slide = work / "growing.ndpi"
    shutil.copyfile(NDPI_DAPI, slide)
    real = pack_module.write_preview

    def append_then_preview(*args, **kwargs):
        with open(slide, "ab") as f:  # a copy still being written
            f.write(b"\0" * 10)
        return real(*args, **kwargs)

    monkeypatch.setattr(pack_module, "write_preview", append_then_preview)
    assert main(["pack", str(slide), "-o", str(work / "growing.zarr"), "--scheduler", "synchronous", "-q"]) == 1
    assert "changed while it was packed" in capsys.readouterr().err
    assert not (work / "growing.zarr").exists() and not (work / "growing.zarr.partial").exists()


FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name", ["archive_v2_idf.zarr", "archive_v2_kept.zarr", "archive_v3_kept.zarr",
                                  "archive_v4_adapted.zarr"])
def test_archives_of_earlier_versions_read_and_verify(name, tmp_path, capsys):
    import zarr
    from wsi_idf import open_archive
    from wsi_idf.jobs.verify import verify_archive
    fixture = FIXTURES / name
    assert verify_archive(fixture, scheduler="synchronous")["ok"]
    archive = open_archive(fixture)
    h, w = archive.levels[0].shape[1:]
    assert np.array_equal(archive.region(0, 0, 0, w, h), zarr.open_group(fixture, mode="r")["0"][...].transpose(1, 2, 0))
    assert main(["info", str(fixture)]) == 0
    text = capsys.readouterr().out
    if name.startswith("archive_v2"):
        assert "not restorable: written before wsi-idf 0.5" in text
        assert main(["restore", str(fixture), "-o", str(tmp_path / "x.tif")]) == 1
    else:  # the source file, which is nowhere else, comes back with the sha256 recorded at pack time
        restored = tmp_path / "source.tif"
        assert main(["restore", str(fixture), "-o", str(restored), "-q"]) == 0
        assert sha256(restored) == archive.metadata["source"]["sha256"]
        import tifffile
        with tifffile.TiffFile(restored) as tif:
            assert np.array_equal(tif.series[0].levels[0].asarray(), archive.region(0, 0, 0, w, h))


def test_a_truncated_ndpi_is_one_line_and_nothing_is_written(work, capsys):
    cut = work / "cut.ndpi"
    cut.write_bytes(NDPI_DAPI.read_bytes()[:2_000_000])
    assert main(["pack", str(cut), "-o", str(work / "cut.zarr"), "--scheduler", "synchronous"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "truncated or damaged" in err
    assert not (work / "cut.zarr").exists() and not (work / "cut.zarr.partial").exists()


def test_pack_says_when_openslide_decoded_the_pixels(work, capsys):
    from slides import SLIDES
    out = work / "boxes.zarr"
    assert main(["pack", str(SLIDES / "boxes.tiff"), "-o", str(out), "--backend", "openslide",
                 "--scheduler", "synchronous"]) == 0
    text = capsys.readouterr().out
    assert "read      through OpenSlide: its decoded pixels were coded with the IDF" in text
    assert "not restorable" in text
