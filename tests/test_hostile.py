"""Damaged and hostile archives (issue 12): built here from a real packed slide, each case first
reproduced, then refused. wsi-idf's own readers (region, unpack, verify, previews, open_archive)
never return a wrong or missing pixel, never load a file an archive names, and stay within memory.
"""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import zarr

from conftest import NO_DATA
from slides import CMU_SVS
from wsi_idf import open_archive
from wsi_idf.cli import main
from wsi_idf.errors import ArchiveError, CorruptPatchError, VerificationError, WeightsMismatchError, WsiIdfError
from wsi_idf.outputs import lock_path, output_lock
from wsi_idf.jobs.pack import pack_slide
from wsi_idf.archive.progressive import read_region
from wsi_idf.coding.registry import RETIRED, WEIGHTS_DIR
from wsi_idf.storage.shards import build_shard
from wsi_idf.jobs.verify import verify_archive

pytestmark = pytest.mark.skipif(not CMU_SVS.exists(), reason=NO_DATA)
REPO = Path(__file__).resolve().parents[1]
SHARD = 160  # 2x2 patches per shard: level 0 (400x560) has 3x4 shards
SHARD_01_PATCHES = [[0, 160, 0], [0, 160, 80], [0, 240, 0], [0, 240, 80]]  # [level, x, y] of shard (0, 1)


SEED = 43  # the mosaic of the module's slide (conftest: work, source, reference)


@pytest.fixture(scope="module")
def reference_v2(work, source) -> Path:
    out = work / "reference-v2.zarr"
    pack_slide(source[0], out, shard=SHARD, zarr_format=2, scheduler="synchronous")
    return out


@pytest.fixture
def archive(reference, tmp_path) -> Path:
    """A fresh copy to damage."""
    return Path(shutil.copytree(reference, tmp_path / "copy.zarr"))


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def save(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value))


def shard(archive: Path, level: int, row: int, col: int) -> Path:
    return archive / str(level) / "c" / "0" / str(row) / str(col)


def read_index(path: Path) -> tuple[bytes, np.ndarray]:
    data = path.read_bytes()
    index = np.frombuffer(data[-68:-4], dtype="<u8").reshape(4, 2).copy()
    return data[:-68], index


def write_index(path: Path, body: bytes, index: np.ndarray) -> None:
    raw = np.asarray(index, dtype="<u8").tobytes()
    path.write_bytes(body + raw + struct.pack("<I", google_crc32c.value(raw)))


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") <= 1, err
    return code, err


def refused_everywhere(archive: Path, capsys, tmp_path: Path, damaged: list[list[int]] | None = None) -> None:
    """region, a Dask level, unpack and verify (listing the damaged patches) all refuse."""
    with pytest.raises(WsiIdfError, match="damaged|missing|forged"):
        open_archive(archive).region(0, 0, 0, 560, 400)
    with pytest.raises(WsiIdfError):
        open_archive(archive).levels[0].compute()
    code, err = run_cli(capsys, "unpack", str(archive), "-o", str(tmp_path / "out.tif"), "-q")
    assert code == 1 and not (tmp_path / "out.tif").exists()
    code, err = run_cli(capsys, "region", str(archive), "--x", "0", "--y", "0", "--width", "560", "--height", "400",
                        "-o", str(tmp_path / "r.png"), "-q")
    assert code == 1 and not (tmp_path / "r.png").exists()
    with pytest.raises(VerificationError) as info:
        verify_archive(archive, scheduler="synchronous")
    if damaged is not None:
        assert sorted(info.value.damaged) == sorted(damaged)


# 1, 2: empty and missing shard files; missing chunk files in Zarr v2
@pytest.mark.parametrize("damage", ["empty", "deleted"])
def test_empty_or_missing_shard_is_refused_by_every_wsi_idf_reader(archive, capsys, tmp_path, damage):
    path = shard(archive, 0, 0, 1)
    if damage == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
    refused_everywhere(archive, capsys, tmp_path, SHARD_01_PATCHES)
    assert run_cli(capsys, "verify", str(archive), "-q")[0] == 3


def test_missing_chunk_file_in_zarr_v2(reference_v2, capsys, tmp_path):
    archive = Path(shutil.copytree(reference_v2, tmp_path / "v2.zarr"))
    (archive / "0" / "0" / "1" / "2").unlink()
    refused_everywhere(archive, capsys, tmp_path, [[0, 160, 80]])


# 3: previews of damaged bytes (each flow level's stream has its own CRC32C)
def test_damaged_byte_in_a_preview_prefix_raises(archive):
    path = shard(archive, 0, 0, 0)
    body, index = read_index(path)
    offset = int(index[0, 0])
    data = bytearray(body)
    data[offset + 17 + 1 + 16 + 8] ^= 0x40  # inside the first (top latents) stream's words
    write_index(path, bytes(data), index)
    for levels in (1, 2):
        with pytest.raises(CorruptPatchError, match="x=0, y=0 is damaged"):
            read_region(archive, 0, 0, 0, 80, 80, flow_levels=levels)
    read_region(archive, 0, 80, 0, 80, 80, flow_levels=1)  # the neighbour is intact


# 4: verify reads exactly what readers and viewers read
@pytest.mark.parametrize("where", ["ome", "wsi_idf"])
def test_level_paths_other_than_the_canonical_ones_are_refused(archive, capsys, where):
    shutil.copytree(archive / "0", archive / "0b")
    meta = load(archive / "zarr.json")
    if where == "ome":
        meta["attributes"]["ome"]["multiscales"][0]["datasets"][0]["path"] = "0b"
    else:
        meta["attributes"]["wsi_idf"]["levels"][0]["path"] = "0b"
    save(archive / "zarr.json", meta)
    with pytest.raises(ArchiveError, match="damaged or forged"):
        open_archive(archive)
    assert run_cli(capsys, "verify", str(archive), "-q")[0] == 3
    assert run_cli(capsys, "info", str(archive))[0] == 1


# 5: sizes come from the arrays; attributes that disagree are damage
@pytest.mark.parametrize("field, value", [("height", 0), ("height", 480), ("width", 80)])
def test_attributes_that_disagree_with_the_arrays_are_refused(archive, capsys, field, value):
    meta = load(archive / "zarr.json")
    meta["attributes"]["wsi_idf"]["levels"][0][field] = value
    save(archive / "zarr.json", meta)
    code, err = run_cli(capsys, "verify", str(archive), "-q")
    assert code == 3 and "damaged or forged" in err


def test_garbage_shards_with_a_forged_checksum_fail_verify(archive, capsys):
    meta = load(archive / "zarr.json")
    meta["attributes"]["wsi_idf"]["levels"][0]["checksum"]["value"] = \
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"  # sha256 of no bytes
    save(archive / "zarr.json", meta)
    for path in (archive / "0" / "c").rglob("*"):
        if path.is_file():
            path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))
    code, err = run_cli(capsys, "verify", str(archive), "-q")
    assert code == 3


# 6: a forged shard index (valid CRC): out of the file, aliased, or chunks moved
@pytest.mark.parametrize("forgery", ["past-end", "alias", "huge", "offset-2^63"])
def test_forged_shard_index_is_refused(archive, capsys, tmp_path, forgery):
    path = shard(archive, 0, 0, 1)
    body, index = read_index(path)
    if forgery == "past-end":
        index[1, 0] = len(body) + 1000
    elif forgery == "alias":
        index[1] = index[0]
    elif forgery == "huge":
        index[1, 1] = 2**62
    else:
        index[1, 0] = 2**63
    write_index(path, body, index)
    refused_everywhere(archive, capsys, tmp_path)


def test_moved_chunks_and_shards_are_refused(archive, reference, capsys, tmp_path):
    """Patches carry their position: swapped chunks (a consistent forged index) and a shard file
    copied over another are refused by wsi-idf's readers."""
    path = shard(archive, 0, 0, 1)
    body, index = read_index(path)
    blobs = [body[int(o):int(o + n)] for o, n in index]
    path.write_bytes(build_shard([blobs[1], blobs[0], blobs[2], blobs[3]], np.ones((2, 2), bool)))
    with pytest.raises(CorruptPatchError, match="moved or aliased"):
        open_archive(archive).region(0, 160, 0, 160, 80)
    shutil.copy(shard(reference, 0, 0, 0), path)  # a whole shard file put in another's place
    with pytest.raises(CorruptPatchError, match="moved or aliased"):
        open_archive(archive).region(0, 160, 0, 80, 80)
    with pytest.raises(VerificationError):
        verify_archive(archive, scheduler="synchronous")


# 7: two writers into one output
def test_a_second_writer_on_the_same_output_refuses_at_once(source, reference, tmp_path, capsys):
    out = Path(shutil.copytree(reference, tmp_path / "busy.zarr"))
    with output_lock(out):
        code, err = run_cli(capsys, "pack", str(source[0]), "-o", str(out), "--overwrite", "--shard", str(SHARD),
                            "--scheduler", "synchronous", "-q")
        assert code == 1 and "another wsi-idf job is writing" in err
        code, err = run_cli(capsys, "pack", str(source[0]), "-o", str(out), "--resume", "--shard", str(SHARD),
                            "--scheduler", "synchronous", "-q")
        assert code == 1 and "another wsi-idf job is writing" in err
    assert not lock_path(out).exists()
    verify_archive(out, scheduler="synchronous")  # the archive it held is untouched


def test_two_simultaneous_overwrite_packs_leave_one_complete_archive(source, reference, tmp_path):
    out = Path(shutil.copytree(reference, tmp_path / "race.zarr"))
    command = [sys.executable, "-m", "wsi_idf.cli", "pack", str(source[0]), "-o", str(out), "--overwrite",
               "--shard", str(SHARD), "--scheduler", "synchronous", "-q"]
    procs = [subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert any(code == 0 for code, _ in results), results
    for code, err in results:
        assert code == 0 or "another wsi-idf job is writing" in err, err
    verify_archive(out, source=source[0], scheduler="synchronous")
    assert not lock_path(out).exists() and not (tmp_path / "race.zarr.partial").exists()


def test_a_file_named_like_the_lock_is_never_touched(tmp_path):
    out = tmp_path / "a.zarr"
    lock_path(out).write_text("my notes")
    with pytest.raises(ArchiveError, match="not a wsi-idf lock"):
        with output_lock(out):
            pass
    assert lock_path(out).read_text() == "my notes"


# 8: an archive never chooses a file on the reader's machine
@pytest.mark.parametrize("name", ["planted", "relative", "glob"])
def test_a_model_named_by_an_archive_is_never_a_path(archive, tmp_path, name):
    planted = tmp_path / "planted-01b41279.safetensors"
    planted.symlink_to("/dev/zero")  # old readers hashed this forever
    model = {"planted": str(planted), "relative": f"../../..{planted}", "glob": "**"}[name]
    meta = load(archive / "0" / "zarr.json")
    meta["codecs"][0]["configuration"]["codecs"][0]["configuration"] = {"model": model, "weights": "01b41279"}
    save(archive / "0" / "zarr.json", meta)
    with pytest.raises(ArchiveError, match="damaged or forged"):
        open_archive(archive)
    code = f"import zarr\ntry:\n    zarr.open_group({str(archive)!r})['0'][:, :80, :80]\nexcept Exception as e:\n" \
           "    print(type(e).__name__, e)\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "unknown model" in result.stdout, result.stdout + result.stderr


# 9: bounded memory on zstd bombs
@pytest.mark.parametrize("target", ["preview", "label"])
def test_zstd_bombs_raise_instead_of_filling_memory(tmp_path, target):
    from numcodecs import Zstd
    out = tmp_path / "cmu.zarr"
    pack_slide(CMU_SVS, out, scheduler="synchronous", codec="idf")  # zstd associated images and preview
    folder = out / ("preview/0" if target == "preview" else "associated/label")
    chunk = next(p for p in (folder / "c").rglob("*") if p.is_file())
    chunk.write_bytes(Zstd(level=1).encode(np.zeros(2**28, np.uint8)))  # 256 MB in a few KB
    archive = open_archive(out)
    with pytest.raises(ArchiveError, match="does not decompress to its"):
        archive.preview(0) if target == "preview" else archive.associated("label")


# 10: forged sizes: no unbounded work or memory before the first message
@pytest.mark.parametrize("side", [10**9, 2**20])
def test_forged_huge_level_is_refused_quickly(archive, capsys, side):
    meta = load(archive / "zarr.json")
    meta["attributes"]["wsi_idf"]["levels"][0].update(width=side, height=side)
    save(archive / "zarr.json", meta)
    level = load(archive / "0" / "zarr.json")
    level["shape"] = [3, side, side]
    save(archive / "0" / "zarr.json", level)
    timer = threading.Timer(60, lambda: pytest.fail("verify took over a minute"))
    timer.start()
    try:
        code, err = run_cli(capsys, "verify", str(archive), "-q")
    finally:
        timer.cancel()
    assert code == 3 and ("damaged or forged" in err or "missing (or its size is forged)" in err)


# 11: a region is bounded
def test_a_region_over_the_limit_is_refused_with_the_limit(reference, tmp_path, capsys):
    code, err = run_cli(capsys, "region", str(reference), "--x", "0", "--y", "0", "--width", "10000",
                        "--height", "10000", "-o", str(tmp_path / "big.png"))
    assert code == 1 and "64 Mpx" in err and "unpack" in err and not (tmp_path / "big.png").exists()


# 12: nonsense in the attributes is one clear message, never a traceback
MUTATIONS = [("levels.0.shard", 0), ("levels.0.shard", -400), ("levels.0.shard", float("nan")),
             ("levels.0.width", "400"), ("levels.0.checksum", None), ("levels.0.checksum.value", None),
             ("levels", {}), ("model.name", "../x"), ("model.weights", 5), ("slide.mpp", ["a", 1]),
             ("associated", ["../../etc"]), ("levels.0.downsample", float("inf")), ("source", None)]


def mutate(meta: dict, key: str, value) -> None:
    *path, last = key.split(".")
    node = meta
    for part in path:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[int(last) if isinstance(node, list) else last] = value


@pytest.mark.parametrize("key, value", MUTATIONS, ids=[f"{k}={v!r}" for k, v in MUTATIONS])
def test_nonsense_attributes_give_one_clear_message(archive, capsys, tmp_path, key, value):
    meta = load(archive / "zarr.json")
    mutate(meta["attributes"]["wsi_idf"], key, value)
    save(archive / "zarr.json", meta)
    assert run_cli(capsys, "info", str(archive))[0] == 1
    assert run_cli(capsys, "verify", str(archive), "-q")[0] == 3
    assert run_cli(capsys, "region", str(archive), "--x", "0", "--y", "0", "--width", "80", "--height", "80",
                   "-o", str(tmp_path / "r.png"))[0] == 1


def test_weights_that_are_not_installed_give_a_clear_error_not_keyerror(archive, capsys):
    """An archive that names weights without carrying them (as before format 4) and this wsi-idf lacks."""
    unknown = "0" * 64
    meta = load(archive / "zarr.json")
    for lv_path in ("0", "1"):
        level = load(archive / lv_path / "zarr.json")
        config = level["codecs"][0]["configuration"]["codecs"][0]["configuration"]
        config["weights"] = unknown
        del config["embedded"]
        save(archive / lv_path / "zarr.json", level)
    meta["attributes"]["wsi_idf"]["model"]["weights"] = unknown
    del meta["attributes"]["wsi_idf"]["model"]["embedded"]
    save(archive / "zarr.json", meta)
    code, err = run_cli(capsys, "region", str(archive), "--x", "0", "--y", "0", "--width", "80", "--height", "80",
                        "-o", str(archive.parent / "r.png"))
    assert code == 1 and "cannot load the archive's model" in err and "00000000" in err
    array = zarr.open_group(archive, mode="r")["0"]  # opens: the model loads on first use
    with pytest.raises(WeightsMismatchError, match="does not have"):
        array[:, :80, :80]


def test_a_chunk_naming_other_shipped_weights_is_refused_by_every_path(archive, capsys, tmp_path):
    assert (WEIGHTS_DIR / RETIRED[0].weights).is_file()
    path = shard(archive, 0, 0, 0)
    body, index = read_index(path)
    data = bytearray(body)
    data[int(index[0, 0]) + 4:int(index[0, 0]) + 8] = RETIRED[0].weights_id
    write_index(path, bytes(data), index)
    with pytest.raises(WsiIdfError, match="damaged"):
        zarr.open_group(archive, mode="r")["0"][:, :80, :80]
    for levels in ([], ["--levels", "1"]):
        code, err = run_cli(capsys, "region", str(archive), "--x", "0", "--y", "0", "--width", "80", "--height", "80",
                            "-o", str(tmp_path / "r.png"), *levels)
        assert code == 1 and "other weights" in err


# the fuzz test: metadata, level metadata and shard indices, in a memory-limited process
@pytest.mark.parametrize("seed, cases", [(0, 30), pytest.param(1, 300, marks=pytest.mark.slow)])
def test_fuzzed_metadata_never_gives_a_traceback_a_hang_or_a_memory_blowup(reference, tmp_path, seed, cases):
    result = subprocess.run([sys.executable, str(REPO / "tests" / "hostile_fuzz.py"), str(reference), str(tmp_path),
                             str(seed), str(cases), "6"], capture_output=True, text=True, timeout=3600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print("fuzz:", report["cases"], "cases, exit codes", report["exit_codes"])
    assert report["failures"] == [], json.dumps(report["failures"][:5], indent=1)


def test_an_archive_written_by_wsi_idf_0_2_still_reads(capsys, tmp_path):
    """Archive format 1 (patch format 2, no positions) is read as before: its level checksums
    prove every pixel; previews and unpack work."""
    fixture = Path(__file__).parent / "fixtures" / "archive_v1.zarr"
    assert json.loads((fixture / "zarr.json").read_text())["attributes"]["wsi_idf"]["format_version"] == 1
    assert verify_archive(fixture, scheduler="synchronous")["ok"]
    archive = open_archive(fixture)
    full = archive.region(0, 10, 20, 200, 150)
    assert np.array_equal(full, archive.levels[0][:, 20:170, 10:210].compute().transpose(1, 2, 0))
    assert np.array_equal(full, zarr.open_group(fixture, mode="r")["0"][:, 20:170, 10:210].transpose(1, 2, 0))
    assert archive.region(0, 10, 20, 200, 150, levels=1).shape == (150, 200, 3)
    assert run_cli(capsys, "unpack", str(fixture), "-o", str(tmp_path / "v1.tif"), "-q")[0] == 0


@pytest.mark.parametrize("cases", [10, pytest.param(150, marks=pytest.mark.slow)])
def test_fuzzed_metadata_of_an_archive_that_keeps_source_tiles(tmp_path, cases):
    """The same fuzz on the CMU slide packed with its own JPEG tiles (kept-tile chunks, JPEG XL
    associated images)."""
    reference = tmp_path / "cmu.zarr"
    pack_slide(CMU_SVS, reference, scheduler="synchronous")
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run([sys.executable, str(REPO / "tests" / "hostile_fuzz.py"), str(reference), str(work),
                             "5", str(cases), "6"], capture_output=True, text=True, timeout=3600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["failures"] == [], json.dumps(report["failures"][:5], indent=1)
