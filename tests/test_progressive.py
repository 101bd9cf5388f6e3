"""Progressive decoding: previews from the coarse flow levels, from fewer bytes; all levels is lossless."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import NO_DATA
from slides import CMU_SVS, mosaic, pyramid, write_pyramidal_tiff
from wsi_idf import decode_patches, encode_patches, open_archive
from wsi_idf.errors import ArchiveError
from wsi_idf.coding import patch_format as fmt
from wsi_idf.cli import main
from wsi_idf.coding.batch import preview_prefix
from wsi_idf.jobs.pack import pack_slide
from wsi_idf.archive.progressive import read_region
from wsi_idf.config import IDFConfig
from wsi_idf.coding.registry import RETIRED, WEIGHTS_DIR

FIXTURES = Path(__file__).parent / "fixtures"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def cut(blobs: list[bytes], levels: int) -> list[bytes]:
    return [b if (n := preview_prefix(b[:64], levels)) < 0 else b[:n] for b in blobs]


@pytest.mark.parametrize("model", ["fast", str(WEIGHTS_DIR / RETIRED[0].weights),
                                   str(WEIGHTS_DIR / next(e for e in RETIRED if isinstance(e.config, IDFConfig)).weights)])
def test_previews_improve_with_levels_and_all_levels_is_lossless(val_patches, model):
    blobs = encode_patches(val_patches[:8], model=model)
    assert all(fmt.unpack(b)[0].version == fmt.PATCH_FORMAT for b in blobs)
    quality, sizes = [], []
    for k in (1, 2, 3):
        prefix = cut(blobs, k)
        preview = decode_patches(prefix, levels=k)
        assert np.array_equal(preview, decode_patches(blobs, levels=k))  # fewer bytes, same preview
        quality.append(psnr(preview, val_patches[:8]))
        sizes.append(sum(map(len, prefix)))
    # model v2's previews are coarser than v1's (README, Progressive previews), and improve with every level
    assert quality[0] < quality[1] < quality[2] == float("inf") and quality[0] > 15 and quality[1] > 20
    assert sizes[0] < sizes[1] < sizes[2] == sum(map(len, blobs))
    assert np.array_equal(decode_patches(blobs, levels=3), val_patches[:8])


def test_cut_preview_refuses_full_decode(val_patches):
    blob = encode_patches(val_patches[:1])[0]
    with pytest.raises(Exception, match="damaged"):
        decode_patches(cut([blob], 1))


def test_version_1_patches_give_previews_too():
    manifest = json.loads((FIXTURES / "format_v1" / "manifest.json").read_text())
    item = next(i for i in manifest if i["mode"] == "IDF" and i["file"].startswith("fast"))
    blob = (FIXTURES / "format_v1" / item["file"]).read_bytes()
    assert preview_prefix(blob[:64], 1) == -1  # one stack: read whole
    full = decode_patches([blob])
    assert psnr(decode_patches([blob], levels=1), full) > 20


def test_plain_patches_are_exact_at_any_level(hard_patches):
    blobs = encode_patches(hard_patches)
    plain = [i for i, b in enumerate(blobs) if fmt.unpack(b)[0].mode != fmt.Mode.IDF]
    assert plain and all(preview_prefix(blobs[i][:64], 1) == -1 for i in plain)
    assert np.array_equal(decode_patches([blobs[i] for i in plain], levels=1), hard_patches[plain])


@pytest.mark.skipif(not CMU_SVS.exists(), reason=NO_DATA)
def test_archive_preview_reads_fewer_bytes(tmp_path, capsys):
    levels = pyramid(mosaic(480, 640, seed=51), 1)
    archive = tmp_path / "a.zarr"
    pack_slide(write_pyramidal_tiff(tmp_path / "s.tif", levels), archive, shard=320, scheduler="synchronous")
    region = (0, 37, 45, 401, 350)
    full, full_bytes = read_region(archive, *region)
    assert np.array_equal(full, levels[0][45:395, 37:438])
    previews = [read_region(archive, *region, flow_levels=k) for k in (1, 2)]
    assert previews[0][1] < previews[1][1] < full_bytes
    assert psnr(previews[0][0], full) < psnr(previews[1][0], full) and psnr(previews[1][0], full) > 15
    assert np.array_equal(open_archive(archive).region(0, 37, 45, 401, 350, flow_levels=1), previews[0][0])
    assert np.array_equal(open_archive(archive).region(0, 37, 45, 401, 350, levels=1), previews[0][0])  # 0.3's name
    with pytest.raises(ArchiveError, match="disagree"):
        read_region(archive, *region, flow_levels=1, levels=2)
    out = tmp_path / "preview.png"
    assert main(["region", str(archive), "--x", "37", "--y", "45", "--width", "401", "--height", "350",
                 "--flow-levels", "1", "-o", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["bytes_read"] == previews[0][1] and out.exists()


@pytest.mark.parametrize("levels", [1, 2])
def test_a_damaged_byte_never_reaches_a_preview(val_patches, levels):
    """Each stream a preview reads carries its own CRC32C: one flipped byte in the bytes a preview
    reads raises CorruptPatchError, or (where it hits no byte the preview uses, e.g. the unread pixel
    checksum) gives the same preview; a flip inside the words of a stream it decodes always raises."""
    from wsi_idf.coding import patch_format as fmt
    from wsi_idf.errors import CorruptPatchError, WeightsMismatchError
    blob = encode_patches(val_patches[3:4])[0]
    prefix = cut([blob], levels)[0]
    expected = decode_patches([prefix], levels=levels)
    header, payload = fmt.unpack(prefix)
    streams = payload[0]
    counts = np.frombuffer(bytes(payload[1:1 + 4 * (streams - 1)]), dtype="<u4")
    words_start = len(prefix) - len(payload) + 1 + 8 * (streams - 1)
    decoded_words = range(words_start, words_start + 4 * int(counts[:levels].sum()))
    rng = np.random.default_rng(levels)
    for offset in rng.choice(len(prefix), size=min(150, len(prefix)), replace=False):
        damaged = bytearray(prefix)
        damaged[offset] ^= int(rng.integers(1, 256))
        try:
            preview = decode_patches([bytes(damaged)], levels=levels)
        except (CorruptPatchError, WeightsMismatchError):  # the latter: a flip in the weights id
            continue
        assert offset not in decoded_words, f"a flip at byte {offset}, inside a decoded stream, was not caught"
        assert np.array_equal(preview, expected), f"byte {offset} of {len(prefix)} changed the preview silently"
