"""Which patches the smallest-of mode should try lossless JPEG XL on, and at what effort (``make bench-patch-modes``).

On 400 random level-0 patches of each unseen SVS and of the val tiles: the bytes saved by storing the
smallest of the IDF form and JPEG XL at effort 2-5, when JPEG XL is tried only where the IDF writes
under a threshold of bits per sub-pixel, against the CPU time JPEG XL adds (share of the IDF's own
encode time, one thread). The shipped rule (``coding.batch``: effort 3 under 3.0 bpsp) comes from this table.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from wsi_idf.coding.batch import encode_patches  # noqa: E402
from wsi_idf.coding.runtime import torch  # noqa: E402
from wsi_idf.model.data import data_dir, grid_patches, load_tiles  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    sets = {}
    for name in ("cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs"):
        patches = grid_patches([tifffile.imread(data_dir() / "slides" / name, level=0)])
        sets[name] = patches[rng.choice(len(patches), 400, replace=False)]
    patches = grid_patches(load_tiles(data_dir() / "tiles" / "val"))
    sets["val tiles"] = patches[rng.choice(len(patches), 400, replace=False)]
    thresholds = (1.0, 2.0, 2.5, 3.0, 99.0)
    print("| material | effort | " + " | ".join(f"under {t} bpsp: gain, time" if t < 99 else "every patch: gain, time"
                                               for t in thresholds) + " |")
    print("|---|---|" + "---|" * len(thresholds))
    for name, patches in sets.items():
        t0 = time.process_time()
        idf = np.array([len(b) for b in encode_patches(patches, jxl_effort=None)])
        idf_time = time.process_time() - t0
        bpsp = 8 * idf / patches[0].size
        for effort in (2, 3, 4, 5):
            sizes, seconds = [], []
            for patch in patches:
                t0 = time.process_time()
                sizes.append(len(imagecodecs.jpegxl_encode(np.ascontiguousarray(patch.transpose(1, 2, 0)),
                                                           lossless=True, effort=effort)) + 17)
                seconds.append(time.process_time() - t0)
            jxl, seconds = np.array(sizes), np.array(seconds)
            cells = []
            for threshold in thresholds:
                tried = bpsp < threshold
                gain = 1 - np.where(tried, np.minimum(idf, jxl), idf).sum() / idf.sum()
                cells.append(f"{100 * gain:.2f}%, +{100 * seconds[tried].sum() / idf_time:.0f}%")
            print(f"| {name} | {effort} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
