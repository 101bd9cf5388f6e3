"""The integer coding model: equal to an independent int64 reference, exact on every batch size."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import int_reference
from wsi_idf.coding import ideal_bits
from wsi_idf.model_file import load_float_model
from wsi_idf.registry import MODELS, get_model


def torch_forward(model, x):
    outs, priors, top = model.flow.forward(torch.from_numpy(x))
    ints = lambda t: t.numpy().astype(np.int64)
    return [ints(o) for o in outs], [ints(p.rows) for p in priors], [ints(p.centres) for p in priors], ints(top)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_matches_int64_reference(name, val_patches, hard_patches):
    model = get_model(name)
    rng = np.random.default_rng(1)
    x = np.concatenate([val_patches[:4], hard_patches, rng.integers(0, 256, (2, 3, 80, 80), dtype=np.uint8)])
    got = torch_forward(model, x)
    want = int_reference.forward(str(model.path), x)
    for g, w in zip(got, want):
        for a, b in zip(g if isinstance(g, list) else [g], w if isinstance(w, list) else [w]):
            np.testing.assert_array_equal(a, b)


def test_batch_size_does_not_change_latents(val_patches):
    model = get_model()
    together = torch_forward(model, val_patches[:8])
    for i in range(8):
        alone = torch_forward(model, val_patches[i:i + 1])
        np.testing.assert_array_equal(alone[3][0], together[3][i])
        np.testing.assert_array_equal(alone[0][0][0], together[0][0][i])


def test_inverse_undoes_forward(val_patches):
    model = get_model()
    outs, priors, top = model.flow.forward(torch.from_numpy(val_patches[:4]))
    z = top
    for level in reversed(range(model.config.levels)):
        if level < model.config.levels - 1:
            z = torch.cat([z, outs[level]], dim=1)
        z = torch.nn.functional.pixel_shuffle(model.flow.inverse_level(level, z), 2)
    np.testing.assert_array_equal((z + 128).numpy().astype(np.uint8), val_patches[:4])


def test_integer_model_codes_close_to_float_model(val_patches):
    """Export must not lose much: the integer model's NLL stays within 3% of the float model's."""
    model = get_model()
    float_model = load_float_model(model.path).eval()
    with torch.no_grad():
        float_bits = float(float_model(torch.from_numpy(val_patches))[0].sum())
    int_bits = float(ideal_bits(val_patches, model).sum())
    assert int_bits <= 1.03 * float_bits, (int_bits, float_bits)
