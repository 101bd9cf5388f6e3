"""Shard objects built by the pipeline are exactly what zarr's sharding codec reads."""
from __future__ import annotations

import numpy as np
import pytest
import zarr

from wsi_idf.storage.zarr_formats import V3
from wsi_idf.coding.batch import encode_patches
from wsi_idf.errors import ArchiveError
from wsi_idf.coding.registry import get_model
from wsi_idf.digests import level_checksum, region_digest
from wsi_idf.storage.shards import build_shard, cut_patches, shard_boxes, shard_chunks


def test_shard_boxes_cover_the_level_once():
    boxes = shard_boxes(1, 1000, 2600, 1280)
    assert [(b.row, b.col) for b in boxes] == [(0, 0), (0, 1), (0, 2)]
    assert sum((b.y1 - b.y0) * (b.x1 - b.x0) for b in boxes) == 1000 * 2600 and boxes[-1].x1 == 2600


def test_cut_patches_pads_edges_by_repetition():
    region = np.arange(90 * 170 * 3, dtype=np.uint32).astype(np.uint8).reshape(90, 170, 3)
    patches, present = cut_patches(region, 320)
    assert patches.shape == (2 * 3, 3, 80, 80) and present.sum() == 6 and present[:2, :3].all()
    assert np.array_equal(patches[4][:, :10, :10].transpose(1, 2, 0), region[80:90, 80:90])
    assert (patches[5][:, 10:, :] == patches[5][:, 9:10, :]).all()  # last row repeated


def test_built_shards_read_back_through_zarr(tmp_path, val_patches):
    height, width, shard = 250, 410, 160  # partial inner chunks and partial shards on both edges
    rng = np.random.default_rng(0)
    image = np.ascontiguousarray(val_patches[rng.integers(0, len(val_patches), 6 * 6)].reshape(6, 6, 3, 80, 80)
                                 .transpose(0, 3, 1, 4, 2).reshape(480, 480, 3)[:height, :width])
    model = get_model("fast")
    arr = zarr.create_array(store=str(tmp_path / "0"), **V3.level_array_kwargs(height, width, shard, "fast",
                                                                                model.sha256))
    for box in shard_boxes(0, height, width, shard):
        patches, present = cut_patches(image[box.y0:box.y1, box.x0:box.x1], shard)
        data = build_shard(encode_patches(patches, model=model), present)
        path = tmp_path / "0" / "c" / "0" / str(box.row) / str(box.col)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        chunks = list(shard_chunks(data, present.size))
        assert [c is not None for c in chunks] == present.ravel().tolist()
    assert np.array_equal(arr[...].transpose(1, 2, 0), image)
    assert np.array_equal(arr[:, 77:203, 333:].transpose(1, 2, 0), image[77:203, 333:])


def test_damaged_shard_index_is_detected():
    data = bytearray(build_shard([b"abc", b"defg"], np.array([[True, True], [False, False]])))
    assert list(shard_chunks(bytes(data), 4)) == [b"abc", b"defg", None, None]
    data[-10] ^= 1
    with pytest.raises(ArchiveError, match="index checksum"):
        list(shard_chunks(bytes(data), 4))


def test_level_checksum_is_order_sensitive():
    a, b = region_digest(np.zeros((2, 2, 3), np.uint8)), region_digest(np.ones((2, 2, 3), np.uint8))
    assert level_checksum([a, b]) != level_checksum([b, a])
