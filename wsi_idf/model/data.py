"""Real H&E tiles for training, tests and benchmarks (read from ../shared/data, never copied)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..config import PATCH
from ..slide import halve

TILE_SUFFIXES = {".tif", ".tiff", ".png", ".jpg", ".jpeg"}


def data_dir() -> Path:
    """``$WSI_IDF_DATA``, else ``../shared/data`` beside the repository."""
    env = os.environ.get("WSI_IDF_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def read_rgb(path: str | Path) -> np.ndarray | None:
    """An image file as (H, W, 3) uint8; RGBA with opaque alpha becomes RGB; None for other kinds."""
    path = Path(path)
    if path.suffix.lower() in {".tif", ".tiff"}:
        import tifffile
        image = tifffile.imread(path)
    else:
        from PIL import Image
        with Image.open(path) as im:
            image = np.asarray(im)
    if image.dtype != np.uint8 or image.ndim != 3:
        return None
    if image.shape[2] == 4 and (image[..., 3] == 255).all():
        image = image[..., :3]
    return np.ascontiguousarray(image) if image.shape[2] == 3 else None


def load_tiles(folder: str | Path, min_side: int = PATCH) -> list[np.ndarray]:
    """Every RGB tile below ``folder`` (sorted by path) that holds at least one patch."""
    tiles = []
    for path in sorted(Path(folder).rglob("*")):
        if path.suffix.lower() in TILE_SUFFIXES:
            image = read_rgb(path)
            if image is not None and min(image.shape[:2]) >= min_side:
                tiles.append(image)
    return tiles


def grid_patches(tiles: list[np.ndarray], limit: int | None = None) -> np.ndarray:
    """Non-overlapping 80x80 patches of each tile, row-major, as (N, 3, 80, 80) uint8."""
    patches = []
    for tile in tiles:
        rows, cols = tile.shape[0] // PATCH, tile.shape[1] // PATCH
        grid = tile[:rows * PATCH, :cols * PATCH].reshape(rows, PATCH, cols, PATCH, 3)
        patches.append(grid.transpose(0, 2, 4, 1, 3).reshape(-1, 3, PATCH, PATCH))
    out = np.concatenate(patches) if patches else np.empty((0, 3, PATCH, PATCH), np.uint8)
    return np.ascontiguousarray(out[:limit])


def random_crops(tiles: list[np.ndarray], count: int, rng: np.random.Generator, align: int = 1,
                 zoom: float = 0.0) -> np.ndarray:
    """Random 80x80 crops with random flips and 90-degree rotations, as (count, 3, 80, 80) uint8.

    ``align`` puts crop corners on that grid (8: the JPEG block grid, which a multiple-of-8 patch
    keeps under flips and rotations). ``zoom`` is the share of crops taken at half resolution: a
    160x160 crop averaged over 2x2 pixels, as a pyramid's next level is made (archives code every
    level, and it doubles the variety of a small training set). ``zoom=0`` draws exactly as before."""
    sizes = np.array([t.shape[0] * t.shape[1] for t in tiles], dtype=np.float64)
    picks = rng.choice(len(tiles), size=count, p=sizes / sizes.sum())
    out = np.empty((count, 3, PATCH, PATCH), dtype=np.uint8)
    for i, k in enumerate(picks):
        tile = tiles[k]
        side = 2 * PATCH if zoom and min(tile.shape[:2]) >= 2 * PATCH and rng.random() < zoom else PATCH
        y = rng.integers(0, (tile.shape[0] - side) // align + 1) * align
        x = rng.integers(0, (tile.shape[1] - side) // align + 1) * align
        crop = tile[y:y + side, x:x + side]
        if side != PATCH:
            crop = halve(crop)
        crop = np.rot90(crop, k=int(rng.integers(4)))
        if rng.integers(2):
            crop = crop[:, ::-1]
        out[i] = crop.transpose(2, 0, 1)
    return out
