"""Pack a real slide from Python, check it, and read a region back.

    python examples/pack_slide.py [SLIDE] [OUT.zarr]

Defaults to the Aperio JPEG SVS in $WSI_IDF_DATA/slides (../shared/data by default).
"""
import sys
from pathlib import Path

import numpy as np

import wsi_idf
from wsi_idf.model.data import data_dir
from wsi_idf.slide import open_slide
from wsi_idf.jobs.verify import verify_archive

slide = Path(sys.argv[1]) if len(sys.argv) > 1 else data_dir() / "slides" / "cmu-1-small-region.svs"
out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("example-slide.zarr")

# "synchronous" runs in this process; leave scheduler out for an embedded local Dask cluster,
# or pass "tcp://host:port" to use an existing one (GPU workers: `dask worker ... --resources GPU=1`).
summary = wsi_idf.pack_slide(slide, out, model="fast", scheduler="synchronous", overwrite=True)
print(f"{summary['raw_bytes']:,} raw bytes -> {summary['archive_bytes']:,} ({summary['bits_per_subpixel']} bits/sub-pixel)")

verify_archive(out, source=slide, scheduler="synchronous")  # raises ArchiveError on any difference

archive = wsi_idf.open_archive(out)  # levels as Dask arrays (3, H, W) + metadata
print([level.shape for level in archive.levels], archive.mpp, archive.metadata["source"]["sha256"][:16])
region = archive.region(level=0, x=1000, y=1200, width=512, height=512)  # (512, 512, 3) uint8
assert np.array_equal(region, open_slide(slide).read(0, 1200, 1712, 1000, 1512))
