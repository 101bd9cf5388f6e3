"""Integrity of the whole archive (issue 27): previews, associated images and restore data are checked,
every chunk's checksum covers the archive's id, and metadata that lies is caught."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import NO_DATA
from slides import CMU_SVS, TILE_FOLDER, write_philips_tiff
from wsi_idf import open_archive, pack_slide
from wsi_idf.cli import main
from wsi_idf.errors import ArchiveError, CorruptPatchError, VerificationError
from wsi_idf.jobs.verify import verify_archive

pytestmark = pytest.mark.skipif(not TILE_FOLDER.is_dir() or not CMU_SVS.exists(), reason=NO_DATA)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("integrity")


@pytest.fixture(scope="module")
def philips(work) -> Path:
    return write_philips_tiff(work / "philips.tiff")


@pytest.fixture(scope="module")
def kept(work, philips) -> Path:
    """Levels keep their JPEG tiles, macro and label keep their JPEG strips; a zstd preview."""
    out = work / "kept.zarr"
    pack_slide(philips, out, scheduler="synchronous")
    return out


@pytest.fixture(scope="module")
def coded(work, philips) -> Path:
    """Levels coded with the IDF; macro and label in zstd; a zstd preview."""
    out = work / "coded.zarr"
    pack_slide(philips, out, scheduler="synchronous", codec="idf")
    return out


def damaged_copy(archive: Path, name: str, work: Path) -> Path:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(archive, out)
    return out


def flip(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x04
    path.write_bytes(bytes(data))


def chunk_files(folder: Path) -> list[Path]:
    return sorted(p for p in (folder / "c").rglob("*") if p.is_file())


def expect_verify_fails(archive: Path, *words: str) -> str:
    with pytest.raises(VerificationError) as info:
        verify_archive(archive, scheduler="synchronous")
    message = str(info.value)
    assert all(w in message for w in words), message
    return message


def test_every_array_is_checked_and_verify_reads_them_all(coded, kept, work, capsys):
    for archive in (coded, kept):
        meta = open_archive(archive).metadata
        assert len(meta["archive_id"]) == 32 and {"associated/macro", "associated/label"} <= set(meta["checksums"]["arrays"])
        assert verify_archive(archive, scheduler="synchronous")["ok"]
    for array, archive in (("preview/0", coded), ("associated/macro", coded), ("associated/label", kept)):
        damaged = damaged_copy(archive, f"flip-{array.replace('/', '-')}", work)
        flip(chunk_files(damaged / array)[0])
        reader = open_archive(damaged)
        with pytest.raises(ArchiveError, match="damaged"):
            reader.preview(0) if array.startswith("preview") else reader.associated(array.split("/")[1])
        assert main(["verify", str(damaged), "--scheduler", "synchronous", "-q"]) == 3
        assert array.split("/")[1] in capsys.readouterr().err


def test_swapped_strips_of_a_kept_image_are_caught(work):
    cmu = work / "cmu.zarr"
    pack_slide(CMU_SVS, cmu, scheduler="synchronous")  # its macro: 27 JPEG strips, kept
    damaged = damaged_copy(cmu, "swapped.zarr", work)
    first, second = chunk_files(damaged / "associated" / "macro")[:2]
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)
    with pytest.raises(ArchiveError, match="does not match its checksum"):
        open_archive(damaged).associated("macro")
    expect_verify_fails(damaged, "associated image macro")


@pytest.mark.parametrize("storage", ["kept", "coded"])
def test_chunks_of_another_archive_and_stale_readers_raise(storage, kept, coded, philips, work):
    archive = {"kept": kept, "coded": coded}[storage]
    codec = "auto" if storage == "kept" else "idf"
    another = write_philips_tiff(work / f"another-{storage}.tiff", seed=11)  # another slide, same geometry
    other = work / f"other-{storage}.zarr"
    pack_slide(another, other, scheduler="synchronous", codec=codec, overwrite=True)
    target = damaged_copy(archive, f"alien-{storage}.zarr", work)
    shard = Path("0") / "c" / "0" / "0" / "0"
    shutil.copyfile(other / shard, target / shard)  # a whole shard, bytes unchanged
    with pytest.raises(CorruptPatchError, match="another archive"):
        open_archive(target).region(0, 0, 0, 64, 64)
    with pytest.raises(CorruptPatchError, match="another archive"):
        zarr.open_group(target, mode="r")["0"][:, :64, :64]
    expect_verify_fails(target, "shard 0/0.0")

    stale = open_archive(other)  # a reader left open while another slide is packed over the archive
    pack_slide(philips, other, scheduler="synchronous", codec=codec, overwrite=True)
    with pytest.raises(CorruptPatchError, match="another archive"):
        stale.region(0, 0, 0, 64, 64)
    assert np.array_equal(open_archive(other).region(0, 0, 0, 64, 64), open_archive(archive).region(0, 0, 0, 64, 64))

    again = work / f"again-{storage}.zarr"  # the same file packed the same way: the same archive, byte for byte
    pack_slide(philips, again, scheduler="synchronous", codec=codec)
    assert open_archive(again).metadata["archive_id"] == open_archive(archive).metadata["archive_id"]
    assert (again / shard).read_bytes() == (archive / shard).read_bytes()


def edit_metadata(archive: Path, name: str, work: Path, change) -> Path:
    out = damaged_copy(archive, name, work)
    root = json.loads((out / "zarr.json").read_text())
    change(root["attributes"]["wsi_idf"])
    (out / "zarr.json").write_text(json.dumps(root))
    return out


def test_metadata_that_lies_is_caught(kept, work, capsys):
    swapped = edit_metadata(kept, "codec-lie.zarr", work,
                            lambda m: m["levels"][0].update(source_codec="jpeg2000"))
    with pytest.raises(CorruptPatchError, match="holds jpeg data"):
        open_archive(swapped).region(0, 0, 0, 64, 64)
    huge = edit_metadata(kept, "bytes-lie.zarr", work, lambda m: m["levels"][1].update(encoded_bytes=2**62))
    expect_verify_fails(huge, "level 1: the metadata says its chunks take")
    assert main(["info", str(huge)]) == 1 and "claim" in capsys.readouterr().err
    dropped = edit_metadata(kept, "list-lie.zarr", work, lambda m: m["associated"].remove("label"))
    expect_verify_fails(dropped, "associated images stored (label, macro)")
    forged = edit_metadata(kept, "sum-lie.zarr", work,
                           lambda m: m["checksums"]["arrays"]["associated/macro"].__setitem__(0, 7))
    expect_verify_fails(forged, "associated image macro")


def test_damaged_restore_data_is_listed_by_verify(kept, work):
    damaged = damaged_copy(kept, "restore-damage.zarr", work)
    flip(chunk_files(damaged / "restore" / "0" / "skeleton")[0])
    expect_verify_fails(damaged, "restore data of philips.tiff")


HOSTILE = r'''
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # 1 GB of address space: no torch, no model
from wsi_idf.storage.source_tiles import decode_chunk
from wsi_idf.errors import CorruptPatchError
blob = open(sys.argv[1], "rb").read()
try:
    decode_chunk(blob, (3, 240, 240))
except CorruptPatchError as exc:
    print("refused:", exc)
'''


def source_chunk(kind: int, data: bytes) -> bytes:
    from wsi_idf.coding import patch_format as fmt
    from wsi_idf.storage.source_tiles import NO_ID, SOURCE_HEADER
    return fmt.pack(fmt.Mode.SOURCE, NO_ID, 0, SOURCE_HEADER.pack(kind, 255, 255, 0) + data, fmt.position_bytes(None))


def test_hostile_tiles_are_refused_from_their_headers_under_1_gb(tmp_path):
    """Sizes and component counts are read from the stream headers before any decoder runs: each
    hostile tile is one line, in a process limited to 1 GB of address space."""
    import subprocess
    import sys
    import imagecodecs
    from wsi_idf.storage.source_tiles import Kind
    huge_jpeg = imagecodecs.jpeg8_encode(np.full((8192, 8192), 128, np.uint8), level=50)  # 8192x8192 gray
    fill = bytearray(imagecodecs.jpeg8_encode(np.full((16, 16, 3), 9, np.uint8), level=90))
    sof = fill.index(b"\xff\xc0")
    fill[sof + 5:sof + 9] = (60000).to_bytes(2, "big") * 2  # 60000x60000 ...
    fill[sof:sof] = b"\xff\xff\xff"  # ... behind fill bytes
    siz = bytearray(b"\xff\x4f\xff\x51\x00\x29\x00\x00" + struct_pack(">IIIIIIIIH", 240, 240, 0, 0, 240, 240, 0, 0, 1800))
    cases = {"jxl-rebuilding-8192-jpeg": (Kind.JPEG_AS_JPEGXL, imagecodecs.jpegxl_encode_jpeg(huge_jpeg)),
             "jpeg-fill-bytes": (Kind.JPEG, bytes(fill)),
             "j2k-1800-components": (Kind.JPEG2000, bytes(siz) + b"\x07\x01\x01" * 1800 + b"\xff\xd9"),
             "jxl-pixels-huge": (Kind.PIXELS_JPEGXL, imagecodecs.jpegxl_encode(np.zeros((300, 4000, 3), np.uint8)))}
    for name, (kind, data) in cases.items():
        path = tmp_path / name
        path.write_bytes(source_chunk(int(kind), data))
        result = subprocess.run([sys.executable, "-c", HOSTILE, str(path)], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and result.stdout.startswith("refused:"), (name, result.stdout, result.stderr[-500:])
        assert "declares" in result.stdout and result.stdout.count("\n") == 1, (name, result.stdout)
    assert len(cases["jxl-rebuilding-8192-jpeg"][1]) < 20_000  # a few KB that would rebuild a 64 MB image


def struct_pack(fmt: str, *values) -> bytes:
    import struct
    return struct.pack(fmt, *values)


def test_a_source_tile_that_does_not_decode_is_one_line_on_a_real_cluster(work, capsys):
    """An SVS whose JPEGTables tag is gone: the workers' failure is one line, no Dask log, no --resume
    advice (it cannot help), and nothing left behind."""
    import tifffile
    with tifffile.TiffFile(CMU_SVS) as tif:
        entry = tif.pages[0].tags[347].offset
    data = bytearray(CMU_SVS.read_bytes())
    data[entry:entry + 2] = (65000).to_bytes(2, "little")  # JPEGTables becomes an unknown private tag
    broken = work / "no-tables.svs"
    broken.write_bytes(bytes(data))
    out = work / "no-tables.zarr"
    assert main(["pack", str(broken), "-o", str(out), "--workers", "1", "-q"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not decode" in err and "--resume" not in err, err
    assert not out.exists() and not (work / "no-tables.zarr.partial").exists()


def test_a_forged_tile_names_itself_once(kept, work):
    damaged = damaged_copy(kept, "forged-tile.zarr", work)
    shard = damaged / "0" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[0:2] = b"XX"  # the first chunk's magic
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptPatchError) as info:
        open_archive(damaged).region(0, 0, 0, 64, 64)
    message = str(info.value)
    assert message.startswith("level 0 tile x=0, y=0 is damaged: ") and message.count("damaged") == 2, message


def small_array_campaign(archive: Path, work: Path, trials: int, seed: int) -> dict:
    """Flip bytes in or truncate random chunk files of previews and associated images: every read
    through wsi-idf is exact or raises, and verify fails whenever a read raises."""
    target = damaged_copy(archive, f"campaign-{archive.stem}.zarr", work)
    reference = open_archive(archive)
    arrays = [f"associated/{n}" for n in reference.metadata["associated"]] + \
        [f"preview/{k}" for k in range(reference.metadata["preview"]["levels"])]
    originals = {a: (reference.associated(a.split("/")[1]) if a.startswith("associated") else
                     reference.preview(int(a.split("/")[1]))) for a in arrays}
    rng = np.random.default_rng(seed)
    counts = {"trials": 0, "raised": 0, "exact": 0, "wrong": 0, "verify_failed": 0}
    for trial in range(trials):
        array = arrays[int(rng.integers(len(arrays)))]
        files = chunk_files(target / array)
        path = files[int(rng.integers(len(files)))]
        good = path.read_bytes()
        data = bytearray(good)
        if rng.random() < 0.25:
            data = data[:int(rng.integers(0, len(data)))]
        else:
            for _ in range(int(rng.integers(1, 4))):
                data[int(rng.integers(len(data)))] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(data))
        reader = open_archive(target)
        try:
            pixels = reader.associated(array.split("/")[1]) if array.startswith("associated") else \
                reader.preview(int(array.split("/")[1]))
            counts["exact" if np.array_equal(pixels, originals[array]) else "wrong"] += 1
        except ArchiveError as exc:
            assert "damaged" in str(exc), exc
            counts["raised"] += 1
            if trial % 5 == 0:
                with pytest.raises(VerificationError):
                    verify_archive(target, scheduler="synchronous")
                counts["verify_failed"] += 1
        path.write_bytes(good)
        counts["trials"] += 1
    return counts


@pytest.mark.parametrize("trials", [30, pytest.param(400, marks=pytest.mark.slow)])
def test_damaged_previews_and_associated_images_never_read_wrong(trials, coded, kept, work):
    for archive, seed in ((coded, 1), (kept, 2)):
        counts = small_array_campaign(archive, work, trials, seed)
        print(f"small-array damage campaign on {archive.name}: {counts}")
        assert counts["wrong"] == 0 and counts["trials"] == trials
        assert counts["raised"] + counts["exact"] == trials
