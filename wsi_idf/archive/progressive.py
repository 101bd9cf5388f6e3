"""Progressive region reads: fetch only the coarse levels' bytes of each patch, decode a preview.

Version 2 and 3 patches store one rANS stream per flow level, coarsest first, so the first bytes
of each chunk decode the coarse flow levels alone (version 3 checks each of those streams' CRC32C).
The archive's checked reader (``wsi_idf.archive.reader``) uses the shard index to read, for every patch a
region touches, only the head of its chunk and the prefix that ``flow_levels`` needs: fewer bytes from
disk (or object storage) and less decoding. Deflate, raw and version 1 patches are read whole
and decode exactly.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .layout import open_archive
from .reader import flow_levels_arg


def read_region(path: str | Path, level: int, x: int, y: int, width: int, height: int,
                flow_levels: int | None = None, *, levels: int | None = None) -> tuple[np.ndarray, int]:
    """Pixels of a region as (height, width, 3) uint8, decoded from ``flow_levels`` flow levels of each patch
    (None: all, lossless), and the number of bytes read from the archive's chunk files."""
    return open_archive(path).reader(level).region(x, y, width, height, flow_levels_arg(flow_levels, levels))
