"""Encode and decode real 80x80 patches with the batch API, and store them in a Zarr v3 array.

    python examples/encode_patches.py
"""
import numpy as np
import zarr

import wsi_idf
from wsi_idf.model.data import data_dir, grid_patches, load_tiles
from wsi_idf import WsiIdfCodec

patches = grid_patches(load_tiles(data_dir() / "tiles" / "val"))[:16]  # (16, 3, 80, 80) uint8

blobs = wsi_idf.encode_patches(patches, model="fast")
assert np.array_equal(wsi_idf.decode_patches(blobs), patches)
print(f"{patches.nbytes} bytes -> {sum(map(len, blobs))} bytes")

# The same codec inside Zarr: 80x80 inner chunks, 160x160 shards.
image = patches[:4].reshape(2, 2, 3, 80, 80).transpose(2, 0, 3, 1, 4).reshape(3, 160, 160)
arr = zarr.create_array("example.zarr", shape=image.shape, dtype="uint8", chunks=(3, 80, 80),
                        shards=(3, 160, 160), serializer=WsiIdfCodec(model="fast"), compressors=None,
                        fill_value=0, dimension_names=("c", "y", "x"), overwrite=True)
arr[:] = image
# Any reader with wsi-idf installed opens it with plain zarr; no import of wsi_idf needed.
assert np.array_equal(zarr.open_array("example.zarr")[:, 40:120, 40:120], image[:, 40:120, 40:120])
