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


def folder_digest(files: list[Path]) -> str:
    """A multi-file source's sha256: over ``sha256  name`` lines (sha256sum's format), sorted by name."""
    return combined_digest([file_sha256(p) for p in files], files)


def combined_digest(digests: list[str], files: list[Path]) -> str:
    """``folder_digest`` from the files' sha256s already computed."""
    lines = sorted(f"{digest}  {p.name}\n" for digest, p in zip(digests, files, strict=True))
    return hashlib.sha256("".join(lines).encode()).hexdigest()
