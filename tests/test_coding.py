"""Batch encode/decode: exact round trips, the patch format, damage, weights, determinism, old bytes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import wsi_idf
from conftest import DATA, HARD_KINDS, NO_DATA, hard_patch
from wsi_idf import CorruptPatchError, InvalidPatchError, WeightsMismatchError, decode_patches, encode_patches
from wsi_idf.coding import patch_format as fmt
from wsi_idf.coding.registry import MODELS, RETIRED, WEIGHTS_DIR

FIXTURES = Path(__file__).parent / "fixtures" / "format_v1"


def test_roundtrip_real_patches(val_patches):
    blobs = encode_patches(val_patches)
    np.testing.assert_array_equal(decode_patches(blobs), val_patches)
    assert all(fmt.unpack(b)[0].mode == fmt.Mode.IDF for b in blobs)
    assert sum(map(len, blobs)) < 0.6 * val_patches.nbytes


def test_roundtrip_hard_patches(hard_patches):
    blobs = encode_patches(hard_patches)
    np.testing.assert_array_equal(decode_patches(blobs), hard_patches)
    assert max(map(len, blobs)) <= fmt.RAW_BYTES + fmt.HEADER.size + fmt.POSITION.size  # never more than raw + header
    modes = {kind: fmt.unpack(b)[0].mode for kind, b in zip(HARD_KINDS, blobs)}
    assert modes["noise"] in (fmt.Mode.RAW, fmt.Mode.DEFLATE)
    sizes = dict(zip(HARD_KINDS, map(len, blobs)))
    assert sizes["zeros"] < 100 and sizes["full"] < 100 and sizes["checker8"] < 200


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), low=st.integers(0, 255), span=st.integers(0, 255),
       kind=st.sampled_from(["uniform", "blocks", "rows"]))
def test_roundtrip_generated(seed, low, span, kind):
    rng = np.random.default_rng(seed)
    high = min(255, low + span)
    if kind == "uniform":
        p = rng.integers(low, high + 1, (3, 80, 80))
    elif kind == "blocks":
        p = np.kron(rng.integers(low, high + 1, (3, 10, 10)), np.ones((1, 8, 8)))
    else:
        p = np.repeat(rng.integers(low, high + 1, (3, 80, 1)), 80, axis=2)
    patch = p.astype(np.uint8)[None]
    np.testing.assert_array_equal(decode_patches(encode_patches(patch)), patch)


def test_batch_size_does_not_change_bytes(val_patches):
    assert encode_patches(val_patches[:6], batch_size=1) == encode_patches(val_patches[:6], batch_size=256)


def test_every_shipped_model_roundtrips(val_patches):
    """Registered models and retired weights (still read by hash) alike."""
    for weights in sorted({e.weights for e in (*MODELS.values(), *RETIRED)}):
        blobs = encode_patches(val_patches[:3], model=WEIGHTS_DIR / weights)
        np.testing.assert_array_equal(decode_patches(blobs), val_patches[:3])  # model found from the bytes


@pytest.mark.parametrize("bad", [np.zeros((1, 3, 80, 80), np.uint16), np.zeros((1, 4, 80, 80), np.uint8),
                                 np.zeros((3, 80, 80), np.uint8), np.zeros((1, 3, 64, 64), np.uint8), [[1, 2]]])
def test_invalid_input_raises(bad):
    with pytest.raises(InvalidPatchError):
        encode_patches(bad)


def test_truncation_always_raises(val_patches):
    blob = encode_patches(val_patches[:1])[0]
    for n in sorted({0, 1, 5, 11, 12, 13, 16, len(blob) // 2, len(blob) - 4, len(blob) - 1}):
        with pytest.raises(CorruptPatchError):
            decode_patches([blob[:n]])


def test_flipped_bytes_never_give_wrong_pixels(val_patches):
    patch = val_patches[:1]
    blob = bytearray(encode_patches(patch)[0])
    rng = np.random.default_rng(0)
    for _ in range(60):
        damaged = bytearray(blob)
        pos = int(rng.integers(0, len(blob)))
        damaged[pos] ^= 1 << int(rng.integers(0, 8))
        try:
            out = decode_patches([bytes(damaged)])
        except (CorruptPatchError, WeightsMismatchError):
            continue
        # only possible if the damage did not change the pixels at all, and never in the checked header
        assert pos >= fmt.HEADER.size + fmt.POSITION.size, f"a flip in the header (byte {pos}) was not caught"
        np.testing.assert_array_equal(out, patch)


def test_header_damage_has_clear_messages(val_patches):
    blob = encode_patches(val_patches[:1])[0]
    with pytest.raises(CorruptPatchError, match="magic"):
        decode_patches([b"XX" + blob[2:]])
    with pytest.raises(CorruptPatchError, match="newer"):
        decode_patches([blob[:2] + bytes([99]) + blob[3:]])
    with pytest.raises(CorruptPatchError, match="mode"):
        decode_patches([blob[:3] + bytes([77]) + blob[4:]])
    with pytest.raises(CorruptPatchError, match="checksum"):
        decode_patches([blob[:8] + bytes([blob[8] ^ 1]) + blob[9:]])


def test_weights_mismatch_refuses(val_patches, tmp_path):
    blob = encode_patches(val_patches[:1], model="fast")[0]
    other = WEIGHTS_DIR / RETIRED[-1].weights
    with pytest.raises(WeightsMismatchError, match="other weights"):
        decode_patches([blob], model=str(other))
    unknown = blob[:4] + b"\xde\xad\xbe\xef" + blob[8:]
    with pytest.raises(WeightsMismatchError, match="deadbeef"):
        decode_patches([unknown])


def _run(code: str, threads: int) -> str:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    return subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout


def test_encode_and_decode_in_other_processes_threads_and_batches(val_patches, tmp_path):
    np.save(tmp_path / "x.npy", val_patches[:12])
    encode = f"""
import numpy as np, torch, pickle
torch.set_num_threads(1)
from wsi_idf import encode_patches
blobs = encode_patches(np.load({str(tmp_path / 'x.npy')!r}), batch_size=1)
open({str(tmp_path / 'blobs.bin')!r}, 'wb').write(b''.join(len(b).to_bytes(4, 'little') + b for b in blobs))
"""
    decode = f"""
import numpy as np, torch
torch.set_num_threads(2)
from wsi_idf import decode_patches, encode_patches
data = open({str(tmp_path / 'blobs.bin')!r}, 'rb').read()
blobs, i = [], 0
while i < len(data):
    n = int.from_bytes(data[i:i + 4], 'little'); blobs.append(data[i + 4:i + 4 + n]); i += 4 + n
x = np.load({str(tmp_path / 'x.npy')!r})
assert (decode_patches(blobs * 22, batch_size=256)[:12] == x).all()
assert encode_patches(x, batch_size=256) == blobs
print('ok')
"""
    _run(encode, 1)
    assert _run(decode, 2).strip() == "ok"


@pytest.mark.parametrize("folder, version", [("format_v1", 1), ("format_v2", 2), ("model_v2", 2), ("format_v3", 3),
                                             ("fast_e02fec51", 3), ("patch_jxl", 3)])
def test_committed_fixture_bytes_decode(tmp_path, folder, version):
    """Bytes written by earlier versions and models decode to the same pixels forever (a promise)."""
    folder = FIXTURES.parent / folder
    manifest = json.loads((folder / "manifest.json").read_text())
    for item in manifest:
        blob = (folder / item["file"]).read_bytes()
        assert fmt.unpack(blob)[0].version == version
        if item["source"] == "hard":
            expected = hard_patch(item["kind"], item["seed"])
        elif item["source"] == "slide":
            if not (DATA / item["slide"]).is_file():
                pytest.skip(NO_DATA)
            import tifffile
            image = tifffile.imread(DATA / item["slide"], level=0)
            y, x = item["y"], item["x"]
            expected = np.ascontiguousarray(image[y:y + 80, x:x + 80].transpose(2, 0, 1))
        else:
            if not (DATA / "tiles").is_dir():
                pytest.skip(NO_DATA)
            from wsi_idf.model.data import read_rgb
            tile = read_rgb(DATA / item["tile"])
            y, x = item["y"], item["x"]
            expected = np.ascontiguousarray(tile[y:y + 80, x:x + 80].transpose(2, 0, 1))
        position = [tuple(item["position"])] if "position" in item else None
        np.testing.assert_array_equal(decode_patches([blob], positions=position)[0], expected, err_msg=item["file"])
        assert fmt.unpack(blob)[0].mode == fmt.Mode[item["mode"]]
        if position:  # bound to its place: found anywhere else it is damage
            with pytest.raises(CorruptPatchError, match="moved or aliased"):
                decode_patches([blob], positions=[(position[0][0], position[0][1] + 1, position[0][2])])


def test_bytes_written_within_one_percent_of_model_nll(val_patches):
    """rANS overhead: payload bytes <= 1.01 x the integer model's NLL (+ the final partial word)."""
    blobs = encode_patches(val_patches)
    nll_bytes = wsi_idf.ideal_bits(val_patches).sum() / 8
    payload = sum(len(b) - fmt.unpack(b)[0].size for b in blobs)
    assert payload <= 1.01 * nll_bytes + 4 * len(blobs)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA device on this machine")
def test_gpu_encode_equals_cpu_encode(val_patches):
    """The integer model gives the same bytes on a GPU: encode there, decode on the CPU."""
    for name in MODELS:
        gpu = encode_patches(val_patches, model=name, device="cuda", batch_size=256)
        assert gpu == encode_patches(val_patches, model=name, device="cpu", batch_size=7)
        np.testing.assert_array_equal(decode_patches(gpu, device="cpu"), val_patches)


@pytest.mark.slow
def test_every_validation_patch_roundtrips_with_every_model():
    if not (DATA / "tiles" / "val").is_dir():
        pytest.skip(NO_DATA)
    from wsi_idf.model.data import grid_patches, load_tiles
    patches = grid_patches(load_tiles(DATA / "tiles" / "val"))
    for name in MODELS:
        np.testing.assert_array_equal(decode_patches(encode_patches(patches, model=name)), patches)


def test_concurrent_calls_share_the_cores_and_give_them_back(val_patches):
    """Calls in flight at once split the cores (never more than the caller allowed), bytes unchanged."""
    import threading

    import torch

    from wsi_idf.coding.threads import shared_cores, usable_cores
    before = torch.get_num_threads()
    with shared_cores() as alone:
        assert alone.threads == torch.get_num_threads() == max(1, min(before, usable_cores()))
    assert torch.get_num_threads() == before
    inside, fitted, got = threading.Barrier(3), threading.Barrier(3), []

    def call():
        with shared_cores() as share:
            inside.wait()  # all three in flight: each batch now fits a third of the cores
            got.append((share.fit(), torch.get_num_threads()))
            fitted.wait()  # none leaves before all have fitted

    workers = [threading.Thread(target=call) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert got == [(max(1, min(before, usable_cores() // 3)),) * 2] * 3
    blobs = encode_patches(val_patches[:8])
    results: list = [None] * 4

    def decode(k):
        results[k] = decode_patches(blobs)

    threads = [threading.Thread(target=decode, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(r, val_patches[:8]) for r in results)


@pytest.mark.parametrize("count,batch_size,workers", [(196, 64, 2), (64, 64, 2), (5, 64, 4), (1, 64, 2),
                                                      (200, 64, 1), (129, 64, 3), (0, 64, 2), (7, 1, 2)])
def test_split_batches_covers_every_item_in_near_equal_batches(count, batch_size, workers):
    from wsi_idf.coding.threads import split_batches
    batches = split_batches(count, batch_size, workers)
    assert [i for b in batches for i in b] == list(range(count))
    sizes = [len(b) for b in batches]
    # side by side, the batches in work at once hold at most batch_size items together
    assert all(0 < s <= max(1, batch_size // workers) for s in sizes) and (not sizes or max(sizes) - min(sizes) <= 1)
    assert len(batches) >= min(count, workers)  # every core gets a batch when there are enough items


def test_batches_run_side_by_side_one_core_each_in_order(val_patches):
    """With a share of two or more cores, batches run at once on one thread each; results keep their
    order, the caller's thread count is untouched, and the bytes equal a one-at-a-time run."""
    import threading

    import torch

    from wsi_idf.coding.threads import run_batches, shared_cores, usable_cores
    if usable_cores() < 2:
        pytest.skip("needs 2 cores to run batches side by side")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        both_running, seen = threading.Barrier(2, timeout=30), []

        def run(batch):
            both_running.wait()  # fails (BrokenBarrierError) unless two batches run at once
            seen.append((threading.current_thread().name, torch.get_num_threads()))
            return batch * 10

        with shared_cores() as cores:
            assert run_batches(run, [1, 2], cores) == [10, 20]
        assert torch.get_num_threads() == 2
        assert len({name for name, _ in seen}) == 2 and {t for _, t in seen} == {1}
        with shared_cores() as cores:  # one at a time: the calling thread, all of its share
            assert run_batches(lambda b: (threading.current_thread(), torch.get_num_threads()), [1, 2], cores,
                               side_by_side=False) == [(threading.current_thread(), 2)] * 2
        blobs = encode_patches(val_patches[:20], batch_size=5)
        torch.set_num_threads(1)
        assert encode_patches(val_patches[:20], batch_size=5) == blobs
        torch.set_num_threads(2)
        damaged = [blobs[i][:-4] if i in (13, 7) else blobs[i] for i in range(20)]
        with pytest.raises(CorruptPatchError, match="patch 7 ") as info:  # the first damaged, whichever batch
            decode_patches(damaged, batch_size=5)
        assert info.value.index == 7
    finally:
        torch.set_num_threads(before)


def test_freed_tensors_are_reused_not_faulted_in_again(val_patches, tmp_path):
    """After the first coding call, the allocator serves the network's tensors from memory it kept:
    a second decode page-faults almost nothing (with glibc's defaults large tensors are unmapped and
    faulted in afresh: ~23,000 faults for these 32 patches, measured). A user's MALLOC_* setting is
    left alone."""
    import platform
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the allocator setting is glibc's mallopt")
    np.save(tmp_path / "x.npy", val_patches[:32])
    code = f"""
import os, resource, numpy as np, torch
torch.set_num_threads(1)
os.environ["MALLOC_TRIM_THRESHOLD_"] = "65536"  # as Dask's nanny leaves it: not how this process started
from wsi_idf import decode_patches, encode_patches
from wsi_idf.coding.threads import keep_freed_memory
blobs = encode_patches(np.load({str(tmp_path / 'x.npy')!r}))
decode_patches(blobs)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
decode_patches(blobs)
print(keep_freed_memory(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    run = lambda env: subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                                     text=True).stdout.split()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    tuned, faults = run(env)
    untuned, untuned_faults = run(dict(env, MALLOC_TRIM_THRESHOLD_="131072"))  # set at start: respected
    assert (tuned, untuned) == ("True", "False")
    assert int(faults) * 4 < int(untuned_faults), (faults, untuned_faults)  # freed tensors are reused


@pytest.mark.skipif(not (DATA / "slides" / "cmu-1-small-region.svs").is_file(), reason=NO_DATA)
def test_smallest_of_mode_keeps_jpeg_xl_patches_exact_in_previews_too():
    """Where lossless JPEG XL is smaller than the IDF (flat and JPEG-marked patches of an unseen slide)
    it is stored; such patches decode exactly, also in a progressive preview, and are checked."""
    import tifffile
    from slides import CMU_SVS
    from wsi_idf.model.data import grid_patches
    patches = grid_patches([tifffile.imread(CMU_SVS, level=0)[:800, :1600]])
    positions = [(0, i // 20, i % 20) for i in range(len(patches))]
    archive_id = bytes(range(16))
    with_jxl = encode_patches(patches, positions=positions, archive_id=archive_id)
    without = encode_patches(patches, positions=positions, archive_id=archive_id, jxl_effort=None)
    modes = [fmt.unpack(b)[0].mode for b in with_jxl]
    assert modes.count(fmt.Mode.JXL) >= 5 and all(len(a) <= len(b) for a, b in zip(with_jxl, without))
    jxl = [i for i, m in enumerate(modes) if m == fmt.Mode.JXL]
    for levels in (None, 1):
        decoded = decode_patches(with_jxl, positions=positions, archive_id=archive_id, levels=levels)
        np.testing.assert_array_equal(decoded[jxl], patches[jxl])
    np.testing.assert_array_equal(decode_patches(with_jxl, positions=positions, archive_id=archive_id), patches)
    damaged = bytearray(with_jxl[jxl[0]])
    damaged[-3] ^= 0x10
    with pytest.raises(CorruptPatchError):
        decode_patches([bytes(damaged)], positions=positions[jxl[0]:jxl[0] + 1], archive_id=archive_id)
