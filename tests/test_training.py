"""Training: background weighting, crops from slides, and the train -> export -> exact round trip path."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import DATA, NO_DATA
from slides import CMU_SVS
from wsi_idf.cli import main
from wsi_idf.coding.model_file import load_coding_model
from wsi_idf.model.data import CropSource, find_training_data
from wsi_idf.model.training import background_mask

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
    from wsi_idf.coding.registry import weights_file
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


def test_recipe_float_then_quantized_with_ema_and_resumable_optimizer(tmp_path):
    """Float steps, then quantization-aware ones; the checkpoint holds weights, EMA, best EMA and the
    optimizer's moments, so a second run continues the same run instead of re-warming."""
    import torch
    from safetensors.torch import load_file
    from wsi_idf.config import WaveletConfig
    from wsi_idf.model.data import grid_patches, load_tiles
    from wsi_idf.model.flow import QuantNet
    from wsi_idf.model.training import TrainSettings, train
    from wsi_idf.model.wavelet_flow import WaveletIDF
    tiles = load_tiles(DATA / "tiles" / "val" / "cryonuseg")
    val = grid_patches(tiles)[:4]
    ckpt, log = tmp_path / "v2.ckpt.safetensors", []
    settings = TrainSettings(steps=4, batch_size=4, eval_every=2, quantize_from=2, warmup=2, align=8)
    best = train(WaveletIDF(WaveletConfig()), tiles, val, settings, checkpoint=ckpt, log=log.append)
    assert [r["quantized"] for r in log if "val_bpsp" in r] == [False, True]
    assert all(m.quantize for m in best.modules() if isinstance(m, QuantNet))  # QAT weights are what ships
    state = load_file(str(ckpt))
    assert int(state["step"]) == 4 and any(k.startswith("optim.") and k.endswith("exp_inf") for k in state)
    assert {k.split(".")[0] for k in state} >= {"model", "ema", "best", "optim", "step", "best_val"}
    moments = state["optim.0.exp_avg"].clone()
    model = WaveletIDF(WaveletConfig())
    train(model, tiles, val, TrainSettings(steps=6, batch_size=4, eval_every=2, quantize_from=2), checkpoint=ckpt,
          log=log.append)
    assert [r["step"] for r in log if "val_bpsp" in r] == [2, 4, 6] and log[-1]["lr"] == TrainSettings().lr_at(5)
    assert not torch.equal(load_file(str(ckpt))["optim.0.exp_avg"], moments)


def test_grow_starts_a_larger_model_as_the_trained_smaller_one(val_patches, tmp_path):
    """Added residual blocks start as no change (the NLL is identical); an added level starts as the
    plain 5/3 wavelet under a fresh prior, and the grown model still exports to an exact coder."""
    from wsi_idf.coding.batch import decode_patches, encode_patches
    from wsi_idf.coding.registry import WEIGHTS_DIR, entry
    from wsi_idf.config import WaveletConfig
    from wsi_idf.model.export import export_model, load_float_model, new_float_model
    from wsi_idf.model.flow import set_quantized
    from wsi_idf.model.training import CANDIDATES, evaluate, grow

    small = load_float_model(WEIGHTS_DIR / entry("fast").weights)
    patches = val_patches[::100][:6]
    deeper = grow(new_float_model(WaveletConfig(levels=3, blocks=2, prior_blocks=2)), small)
    for m in (small, deeper):
        set_quantized(m, True)
    assert evaluate(deeper, patches) == evaluate(small, patches)
    grown = grow(new_float_model(CANDIDATES["max"]), small)
    coding = load_coding_model(export_model(grown, tmp_path, "max"), "cpu")
    np.testing.assert_array_equal(decode_patches(encode_patches(patches, model=coding), model=coding), patches)
    with pytest.raises(ValueError, match="cannot grow"):
        grow(new_float_model(WaveletConfig(levels=3, width=48)), small)


def test_zoomed_crops_are_pyramid_means_and_zoom_zero_draws_as_before():
    from wsi_idf.model.data import random_crops
    tile = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    plain = random_crops([tile], 8, np.random.default_rng(1))
    assert np.array_equal(plain, random_crops([tile], 8, np.random.default_rng(1), zoom=0.0))
    flat = np.zeros((400, 400, 3), np.uint8)
    flat[::2, ::2] = 3  # 2x2 means of (3, 0, 0, 0) round half up to 1
    assert (random_crops([flat], 8, np.random.default_rng(2), zoom=1.0) == 1).all()


def test_unaugmented_crops_on_the_patch_grid_are_the_patches_a_slide_is_coded_as():
    """Adaptation trains on what it codes: corners on the 80-px grid, no flips or rotations."""
    from wsi_idf.model.data import grid_patches, random_crops
    tile = np.random.default_rng(0).integers(0, 256, (400, 480, 3), dtype=np.uint8)
    grid = {p.tobytes() for p in grid_patches([tile])}
    crops = random_crops([tile], 16, np.random.default_rng(3), align=80, augment=False)
    assert all(c.tobytes() in grid for c in crops)
    assert not all(c.tobytes() in grid for c in random_crops([tile], 16, np.random.default_rng(3), align=80))


def test_fused_activation_rounding_equals_the_straight_through_formula():
    """Training's activation rounding (one autograd function) gives the values and gradients of
    clamp -> round to the grid with a straight-through gradient, which the integer export mirrors."""
    import torch
    from wsi_idf.config import ACT_LEVELS, ACT_MAX
    from wsi_idf.model.flow import quant_act
    x = (torch.randn(4, 8, 12, 12, generator=torch.Generator().manual_seed(0)) * 4).requires_grad_()
    y = x.clamp(0.0, ACT_MAX)
    reference = y + (torch.round(y / (ACT_MAX / ACT_LEVELS)) * (ACT_MAX / ACT_LEVELS) - y).detach()
    fused = quant_act(x)
    assert torch.equal(fused, reference)
    with torch.no_grad():  # evaluation takes the path without the backward mask
        assert torch.equal(quant_act(x), reference)
    g = torch.randn_like(x)
    assert torch.equal(torch.autograd.grad(fused, x, g)[0], torch.autograd.grad(reference, x, g)[0])
