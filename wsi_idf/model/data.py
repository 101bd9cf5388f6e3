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
                 zoom: float = 0.0, augment: bool = True) -> np.ndarray:
    """Random 80x80 crops with random flips and 90-degree rotations, as (count, 3, 80, 80) uint8.

    ``align`` puts crop corners on that grid (8: the JPEG block grid, which a multiple-of-8 patch
    keeps under flips and rotations). ``zoom`` is the share of crops taken at half resolution: a
    160x160 crop averaged over 2x2 pixels, as a pyramid's next level is made (archives code every
    level, and it doubles the variety of a small training set). ``zoom=0`` draws exactly as before.
    ``augment=False``: no flips or rotations (crops exactly as a slide's patches are coded)."""
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
        out[i] = oriented(crop, rng, augment).transpose(2, 0, 1)
    return out


def oriented(crop: np.ndarray, rng: np.random.Generator, augment: bool = True) -> np.ndarray:
    """A random 90-degree rotation and flip of ``crop`` (H, W, 3); unchanged when not ``augment``."""
    if augment:
        crop = np.rot90(crop, k=int(rng.integers(4)))
        if rng.integers(2):
            crop = crop[:, ::-1]
    return crop


def find_training_data(folders: list[Path]) -> tuple[list[np.ndarray], list[Path]]:
    """Tiles (PNG/TIFF/JPEG images) and slide files (SVS, NDPI, MRXS, ...) below ``folders``."""
    slide_suffixes = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".bif", ".svslide"}
    tiles, slides = [], []
    for folder in folders:
        paths = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
        for path in paths:
            suffix = path.suffix.lower()
            if suffix in slide_suffixes or (suffix in {".tif", ".tiff"} and _is_pyramid(path)):
                slides.append(path)
            elif suffix in TILE_SUFFIXES:
                image = read_rgb(path)
                if image is not None and min(image.shape[:2]) >= 80:
                    tiles.append(image)
    return tiles, slides


def _is_pyramid(path: Path) -> bool:
    import tifffile
    try:
        with tifffile.TiffFile(path) as tif:
            return len(tif.series[0].levels) > 1 or tif.is_svs
    except Exception:
        return False


class SlideCrops:
    """Random 80x80 crops from the level 0 of slide files (weighted by area), flipped and rotated.

    ``holdout``: the share of each slide's rows (at the bottom) that training never sees; ``heldout``
    takes validation patches from there."""

    def __init__(self, paths: list[Path], holdout: float = 0.0):
        from ..slide import open_slide
        self.slides = [open_slide(p) for p in paths]
        sizes = np.array([s.levels[0].width * s.levels[0].height for s in self.slides], dtype=np.float64)
        self.p = sizes / sizes.sum()
        self.holdout = holdout

    def _split(self, slide) -> int:
        """The first row of the held-out band of a slide's level 0."""
        return int(slide.levels[0].height * (1 - self.holdout))

    def heldout(self, count: int, seed: int = 1) -> np.ndarray:
        """``count`` patches on the 80-px grid of the held-out bands (fixed by ``seed``), as (N, 3, 80, 80)."""
        from ..config import PATCH
        rng = np.random.default_rng(seed)
        out = []
        for k in rng.choice(len(self.slides), size=count, p=self.p):
            slide = self.slides[k]
            lv, top = slide.levels[0], self._split(slide)
            if lv.height - top < PATCH or lv.width < PATCH:
                continue
            y = top + int(rng.integers(0, (lv.height - top) // PATCH)) * PATCH
            x = int(rng.integers(0, lv.width // PATCH)) * PATCH
            out.append(slide.read(0, y, y + PATCH, x, x + PATCH).transpose(2, 0, 1))
        return np.ascontiguousarray(np.stack(out)) if out else np.empty((0, 3, PATCH, PATCH), np.uint8)

    def sample(self, count: int, rng: np.random.Generator, augment: bool = True) -> np.ndarray:
        from ..config import PATCH
        out = np.empty((count, 3, PATCH, PATCH), dtype=np.uint8)
        for i, k in enumerate(rng.choice(len(self.slides), size=count, p=self.p)):
            slide = self.slides[k]
            lv = slide.levels[0]
            rows = self._split(slide) if self.holdout else lv.height
            y, x = int(rng.integers(0, max(1, rows - PATCH + 1))), int(rng.integers(0, lv.width - PATCH + 1))
            out[i] = oriented(slide.read(0, y, y + PATCH, x, x + PATCH), rng, augment).transpose(2, 0, 1)
        return out


class CropSource:
    """Training crops from tiles and slides, in proportion to their pixel counts."""

    def __init__(self, tiles: list[np.ndarray], slide_paths: list[Path] | None = None, holdout: float = 0.0):
        self.tiles = tiles
        self.slides = SlideCrops(slide_paths, holdout) if slide_paths else None
        tile_px = sum(t.shape[0] * t.shape[1] for t in tiles)
        slide_px = sum(s.levels[0].width * s.levels[0].height for s in self.slides.slides) if self.slides else 0
        if tile_px + slide_px == 0:
            raise ValueError("no training data: no tiles and no slides")
        self.slide_share = slide_px / (tile_px + slide_px)

    def sample(self, count: int, rng: np.random.Generator, align: int = 1, zoom: float = 0.0,
               augment: bool = True) -> np.ndarray:
        from_slides = int(rng.binomial(count, self.slide_share)) if self.slides else 0
        parts = []
        if count - from_slides:
            parts.append(random_crops(self.tiles, count - from_slides, rng, align, zoom, augment))
        if from_slides:
            parts.append(self.slides.sample(from_slides, rng, augment))
        return np.concatenate(parts)
