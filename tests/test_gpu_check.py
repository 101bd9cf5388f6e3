"""``make gpu-check`` must not rot between the rare sessions that have a GPU: its script runs here on
CPU with ``--small`` (the same steps, tiny sizes), and its data staging reproduces the training
run's validation patches exactly."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, NO_DATA
from wsi_idf.model.data import grid_patches
from wsi_idf.model.data import find_training_data

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
pytestmark = pytest.mark.skipif(not (DATA / "tiles" / "val").is_dir(), reason=NO_DATA)


def test_staged_data_holds_the_runs_validation_patches(tmp_path):
    subprocess.run([sys.executable, str(SCRIPT), "--stage", str(tmp_path / "stage")], check=True, cwd=REPO)
    staged = grid_patches(find_training_data([tmp_path / "stage" / "tiles" / "val"])[0])
    full = grid_patches(find_training_data([DATA / "tiles" / "val"])[0])
    assert np.array_equal(staged, full[:: len(full) // 256][:256])
    assert sorted(p.name for p in (tmp_path / "stage" / "tiles" / "train").iterdir())[:2] == ["hipt", "monuseg"]


def test_gpu_check_runs_on_cpu_in_small(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--small", "--out", str(out)],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert all(r["identical_bytes"] == r["patches"] and r["cpu_decode_exact"] and r["device_decode_exact"]
               for r in report["exactness"])
    assert report["pack"]["end_to_end_mpx_s"] > 0 and report["training"]["last_step"] > 0
    assert (out / "fast.ckpt.safetensors").stat().st_size < 16 * 2**20  # what a device run may send back
    assert "identical bytes" in (out / "gpu_check.md").read_text()
