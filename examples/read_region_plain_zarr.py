"""Read a region of an archive with plain zarr: no import of wsi_idf.

The ``wsi_idf`` codec is found through its zarr entry point (it must be installed, as any
codec must); only the 80x80 patches the region touches are read and decoded.

    python examples/read_region_plain_zarr.py ARCHIVE.zarr [LEVEL X Y WIDTH HEIGHT]
"""
import sys

import zarr

path = sys.argv[1] if len(sys.argv) > 1 else "example-slide.zarr"
level, x, y, width, height = (int(v) for v in (sys.argv[2:7] or (0, 1000, 1200, 512, 512)))

group = zarr.open_group(path, mode="r")
multiscale = group.attrs["ome"]["multiscales"][0]  # OME-NGFF 0.5 (Zarr v2 archives: group.attrs["multiscales"])
dataset = multiscale["datasets"][level]
pixel_size = dataset["coordinateTransformations"][0]["scale"][1:]  # micrometres when the slide says

region = group[dataset["path"]][:, y:y + height, x:x + width]  # (3, height, width) uint8
rgb = region.transpose(1, 2, 0)
print(f"level {level}: {rgb.shape} region, pixel size {pixel_size}, mean RGB {rgb.reshape(-1, 3).mean(0).round(1)}")

# Viewers without the codec can show the preview pyramid at PATH/preview (zstd).
preview = zarr.open_group(f"{path}/preview", mode="r")
print("preview levels:", [preview[d["path"]].shape for d in preview.attrs["ome"]["multiscales"][0]["datasets"]])
