"""Checksums wsi-idf writes and checks: of files (sources, model files), of regions, of levels."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def region_digest(region: np.ndarray) -> bytes:
    """sha256 of an (h, w, 3) region's interleaved RGB bytes: the unit of the level checksums."""
    return hashlib.sha256(np.ascontiguousarray(region).tobytes()).digest()


def level_checksum(digests: Sequence[bytes]) -> str:
    """sha256 over the shard digests in C order: computable shard by shard, in parallel."""
    return hashlib.sha256(b"".join(digests)).hexdigest()
