"""Training: background weighting, crops from slides, and the train -> export -> exact round trip path."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import DATA, NO_DATA
from slides import CMU_SVS
from wsi_idf.cli import main
from wsi_idf.model_file import load_coding_model
from wsi_idf.training import CropSource, background_mask, find_training_data

pytestmark = pytest.mark.skipif(not CMU_SVS.exists(), reason=NO_DATA)


def test_background_crops_are_found_on_a_real_slide():
    source = CropSource([], [CMU_SVS])
    crops = source.sample(200, np.random.default_rng(0))
    assert crops.shape == (200, 3, 80, 80)
    mask = background_mask(crops)
    assert 0.1 < mask.mean() < 0.95  # the CMU slide is partly glass
    bright = crops[mask].astype(int)
    assert bright.mean() > 215 and (bright.max(axis=1) - bright.min(axis=1)).mean() < 18


def test_tiles_and_slides_are_told_apart(tmp_path):
    tiles, slides = find_training_data([DATA / "tiles" / "val" / "cryonuseg", CMU_SVS])
    assert len(tiles) == 2 and slides == [CMU_SVS]


def test_train_cli_fine_tunes_and_proves_the_exported_model(tmp_path, capsys):
    out = tmp_path / "ft"
    from wsi_idf.registry import weights_file
    argv = ["train", "fast", "--init-from", str(weights_file("fast")), "--data", str(CMU_SVS), "--data",
            str(DATA / "tiles" / "val" / "cryonuseg"), "--val", str(DATA / "tiles" / "val" / "cryonuseg"),
            "--steps", "3", "--batch-size", "4", "--eval-every", "3", "--out", str(out), "--json", "-q"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["round_trip"] == "exact" and summary["slides"] == 1 and summary["tiles"] == 2
    assert 1 < summary["val_coded_bpsp"] < 8 and summary["val_float_bpsp"] <= summary["val_coded_bpsp"] * 1.05
    model = load_coding_model(summary["model"], "cpu")
    assert model.sha256 == summary["sha256"]
    log = [json.loads(line) for line in (out / "fast.log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 3 and "val_bpsp" in log[-1] and "train_bpsp" in log[-1]
    argv[argv.index("--steps") + 1] = "5"  # continue from the checkpoint
    assert main(argv) == 0
    capsys.readouterr()
    log = [json.loads(line) for line in (out / "fast.log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 5
