"""Faults and damage: kill -9 at random points, full and read-only disks, damaged shards, fuzzed streams.

Nothing may ever be reported complete that is not, and no damaged byte may turn into a wrong pixel.
"""
from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import NO_DATA
from slides import CMU_SVS, mosaic, pyramid, write_pyramidal_tiff
from wsi_idf import decode_patches, encode_patches
from wsi_idf.cli import main
from wsi_idf.storage.numcodecs_codec import WsiIdf
from wsi_idf.errors import VerificationError, WsiIdfError
from wsi_idf.jobs.pack import RECORDS_DIR, partial_path
from wsi_idf.jobs.verify import verify_archive

pytestmark = pytest.mark.skipif(not CMU_SVS.exists(), reason=NO_DATA)
REPO = Path(__file__).resolve().parents[1]
SHARD = 160  # 2x2 patches: many small shards, so faults land in every phase


SEED = 41  # the mosaic of the module's slide (conftest: work, source, reference)


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def pack_command(source: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "wsi_idf.cli", "pack", str(source), "-o", str(out), "--shard", str(SHARD),
            "--scheduler", "synchronous", "-q", *extra]


def _records_written(records: Path) -> int:
    """Shard records so far; a pack that just finished renames its folder away (then: all of them)."""
    try:
        return len(list(records.rglob("*.json")))
    except FileNotFoundError:
        return 10**9


@pytest.mark.parametrize("trial", [*range(3), *(pytest.param(t, marks=pytest.mark.slow) for t in range(3, 15))])
def test_kill_9_at_a_random_point_then_resume_is_identical(work, source, reference, trial):
    rng = np.random.default_rng(trial)
    out = work / f"killed-{trial}.zarr"
    proc = subprocess.Popen(pack_command(source[0], out), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    records = partial_path(out) / RECORDS_DIR
    target = int(rng.integers(1, 20))  # of 24 shards: early, middle and late kills
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and _records_written(records) < target:
        time.sleep(0.01)
    time.sleep(float(rng.uniform(0, 0.3)))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if out.exists():  # the kill came after the rename: then it must be complete
        assert snapshot(out) == snapshot(reference)
        return
    assert partial_path(out).exists()
    with pytest.raises(WsiIdfError, match="not a wsi-idf archive|unfinished"):
        verify_archive(partial_path(out), scheduler="synchronous")
    assert main(pack_command(source[0], out, "--resume")[3:]) == 0
    assert snapshot(out) == snapshot(reference) and not partial_path(out).exists()


def test_resume_clears_the_temporary_file_of_a_write_cut_by_the_kill(work, source, reference):
    """kill -9 inside ``write_atomic`` leaves ``.{name}.{pid}.tmp``: the resumed archive must not keep it."""
    out = work / "cut.zarr"
    proc = subprocess.Popen(pack_command(source[0], out), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    records = partial_path(out) / RECORDS_DIR
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and _records_written(records) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if out.exists():  # finished before the kill on a fast machine: nothing to resume
        pytest.skip("the pack finished before the kill")
    shard_dir = next(p.parent for p in (partial_path(out) / "0").rglob("*") if p.is_file() and p.name.isdigit())
    (shard_dir / ".1.4242.tmp").write_bytes(b"")  # as a cut write_atomic leaves it
    assert main(pack_command(source[0], out, "--resume")[3:]) == 0
    assert snapshot(out) == snapshot(reference)


def test_disk_full_is_one_clear_error_and_nothing_done(source, small_disk, capsys):
    big = write_pyramidal_tiff(small_disk.parent / "big.tif", pyramid(mosaic(1000, 1000, seed=42), 1))
    out = small_disk / "slide.zarr"
    assert main(["pack", str(big), "-o", str(out), "--scheduler", "synchronous", "--shard", "320", "-q"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and err.count("\n") == 1 and "--resume" in err
    assert not out.exists()


def test_read_only_output_is_one_clear_error(source, small_disk, capsys):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    out = small_disk / "slide.zarr"
    assert main(["pack", str(source[0]), "-o", str(out), "--scheduler", "synchronous"]) == 1
    err = capsys.readouterr().err
    assert "cannot write the archive" in err and "Read-only file system" in err
    assert not out.exists()


def damage_campaign(reference: Path, work: Path, trials: int, verify_every: int) -> dict:
    """Flip bytes in or truncate random shards; every patch must read exactly or raise."""
    damaged_root = work / "damaged.zarr"
    shutil.rmtree(damaged_root, ignore_errors=True)
    shutil.copytree(reference, damaged_root)
    group = zarr.open_group(reference, mode="r")
    originals = {level: group[level][...] for level in ("0", "1")}
    shards = sorted(p for p in damaged_root.glob("*/c/0/*/*") if p.is_file())
    rng = np.random.default_rng(1234)
    counts = {"trials": 0, "raised": 0, "exact": 0, "wrong": 0, "verified": 0, "undetected": 0}
    for trial in range(trials):
        path = shards[int(rng.integers(len(shards)))]
        good = path.read_bytes()
        data = bytearray(good)
        if rng.random() < 0.25:
            data = data[: int(rng.integers(0, len(data)))]
        else:
            for _ in range(int(rng.integers(1, 4))):
                data[int(rng.integers(len(data)))] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(data))
        level, row, col = path.parts[-5], int(path.parts[-2]), int(path.parts[-1])
        arr = zarr.open_array(damaged_root / level, mode="r")
        failing = []
        for py in range(row * SHARD, min((row + 1) * SHARD, arr.shape[1]), 80):
            for px in range(col * SHARD, min((col + 1) * SHARD, arr.shape[2]), 80):
                try:
                    patch = arr[:, py:py + 80, px:px + 80]
                except Exception as exc:  # noqa: BLE001 - any raise is a refusal; it must say what broke
                    assert "damaged" in str(exc) or "checksum" in str(exc), exc
                    counts["raised"] += 1
                    failing.append([int(level), px, py])
                    continue
                if np.array_equal(patch, originals[level][:, py:py + 80, px:px + 80]):
                    counts["exact"] += 1
                else:
                    counts["wrong"] += 1
        if not failing and bytes(data) != good:  # changed bytes that no read noticed
            counts["undetected"] += 1
        if trial % verify_every == 0:
            try:
                verify_archive(damaged_root, scheduler="synchronous")
                assert not failing
            except VerificationError as exc:
                assert sorted(exc.damaged) == sorted(failing)
            counts["verified"] += 1
        path.write_bytes(good)
        counts["trials"] += 1
    return counts


def test_damage_campaign_never_yields_wrong_pixels(reference, work):
    counts = damage_campaign(reference, work, trials=1000, verify_every=50)
    print("damage campaign:", counts)
    assert counts["wrong"] == 0 and counts["undetected"] == 0  # no wrong pixel; every changed shard raised somewhere


@given(st.binary(max_size=400))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzzed_bytes_raise_clear_errors(blob):
    with pytest.raises(WsiIdfError):
        decode_patches([blob])


@pytest.fixture(scope="module")
def valid_blobs(source) -> list[bytes]:
    image = source[1][0]
    patches = np.stack([image[y:y + 80, x:x + 80].transpose(2, 0, 1) for y, x in [(0, 0), (160, 240), (320, 480)]])
    blobs = encode_patches(patches)
    return list(zip(blobs, patches))


@given(st.data())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_mutated_streams_and_headers_decode_exactly_or_raise(valid_blobs, data):
    blob, patch = valid_blobs[data.draw(st.integers(0, len(valid_blobs) - 1))]
    mutated = bytearray(blob)
    kind = data.draw(st.sampled_from(["flip", "header", "truncate", "extend"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            mutated[data.draw(st.integers(0, len(mutated) - 1))] ^= data.draw(st.integers(1, 255))
    elif kind == "header":
        mutated[data.draw(st.integers(0, 16))] = data.draw(st.integers(0, 255))  # header and position
    elif kind == "truncate":
        mutated = mutated[: data.draw(st.integers(0, len(mutated) - 1))]
    else:
        mutated += data.draw(st.binary(min_size=1, max_size=64))
    try:
        decoded = WsiIdf().decode(bytes(mutated))
    except WsiIdfError:
        return
    assert np.array_equal(decoded.reshape(3, 80, 80), patch)  # only an unchanged meaning may decode
