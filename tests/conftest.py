"""Shared fixtures: real H&E patches from ../shared/data (skip with a reason when absent) and hard patches."""
from __future__ import annotations

import os
import subprocess
import tempfile

import numpy as np
import pytest

from wsi_idf.model.data import data_dir, grid_patches, load_tiles

DATA = data_dir()
NO_DATA = f"real H&E data not found at {DATA} (set WSI_IDF_DATA to the shared data folder)"


def pytest_configure(config):
    """The suite never reads or writes the user's own models folder: it gets an empty one of its own
    (subprocesses inherit it)."""
    os.environ["WSI_IDF_MODELS"] = tempfile.mkdtemp(prefix="wsi-idf-test-models-")


@pytest.fixture(scope="session")
def val_patches() -> np.ndarray:
    """24 real 80x80 patches spread over every validation tile."""
    if not (DATA / "tiles" / "val").is_dir():
        pytest.skip(NO_DATA)
    patches = grid_patches(load_tiles(DATA / "tiles" / "val"))
    return np.ascontiguousarray(patches[:: len(patches) // 24][:24])


def hard_patch(kind: str, seed: int = 0) -> np.ndarray:
    """Patches that stress the coder: extremes, noise, checkerboards, hard edges."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:80, :80]
    if kind == "zeros":
        p = np.zeros((3, 80, 80))
    elif kind == "full":
        p = np.full((3, 80, 80), 255)
    elif kind == "noise":
        p = rng.integers(0, 256, (3, 80, 80))
    elif kind == "checker1":
        p = np.broadcast_to(((yy + xx) % 2) * 255, (3, 80, 80))
    elif kind == "checker8":
        p = np.broadcast_to(((yy // 8 + xx // 8) % 2) * 255, (3, 80, 80))
    elif kind == "edge":
        p = np.broadcast_to((xx >= 37) * 255, (3, 80, 80))
    elif kind == "gradient":
        p = np.stack([xx * 3, yy * 3, (xx + yy) * 1.5]) % 256
    elif kind == "channels":
        p = np.stack([np.zeros((80, 80)), np.full((80, 80), 255), rng.integers(0, 2, (80, 80)) * 255])
    elif kind == "sparse":
        p = np.where(rng.random((3, 80, 80)) < 0.01, 255, 0)
    else:
        raise ValueError(kind)
    return np.ascontiguousarray(p, dtype=np.uint8)


HARD_KINDS = ["zeros", "full", "noise", "checker1", "checker8", "edge", "gradient", "channels", "sparse"]


@pytest.fixture(scope="session")
def hard_patches() -> np.ndarray:
    return np.stack([hard_patch(kind) for kind in HARD_KINDS])


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs root and mount rights; skipped where they are missing)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root and mount rights)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture(scope="module")
def material(request, tmp_path_factory):
    """A small two-level slide of real tissue and its archive in the module's ``SHARD`` (seed ``SEED``)."""
    from slides import small_slide_and_archive
    name = request.module.__name__.removeprefix("test_")
    return small_slide_and_archive(tmp_path_factory.mktemp(name), seed=request.module.SEED,
                                   shard=request.module.SHARD)


@pytest.fixture(scope="module")
def work(material):
    return material[2].parent


@pytest.fixture(scope="module")
def source(material):
    return material[0], material[1]


@pytest.fixture(scope="module")
def reference(material):
    return material[2]
