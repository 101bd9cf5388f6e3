"""The integer coding model: equal to an independent int64 reference, exact on every batch size."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import int_reference
from wsi_idf.coding.batch import ideal_bits
from wsi_idf.model.export import load_float_model
from wsi_idf.config import WaveletConfig
from wsi_idf.config import IDFConfig
from wsi_idf.coding.registry import MODELS, RETIRED, WEIGHTS_DIR, get_model

SHIPPED = sorted({e.weights for e in (*MODELS.values(), *RETIRED)})


def torch_forward(model, x):
    outs, priors, top = model.flow.forward(torch.from_numpy(x))
    ints = lambda t: t.numpy().astype(np.int64)
    return [ints(o) for o in outs], [ints(p.rows) for p in priors], [ints(p.centres) for p in priors], ints(top)


@pytest.mark.parametrize("weights", SHIPPED)
def test_matches_int64_reference(weights, val_patches, hard_patches):
    model = get_model(WEIGHTS_DIR / weights)
    rng = np.random.default_rng(1)
    x = np.concatenate([val_patches[:4], hard_patches, rng.integers(0, 256, (2, 3, 80, 80), dtype=np.uint8)])
    got = torch_forward(model, x)
    reference = int_reference.forward_wavelet if isinstance(model.config, WaveletConfig) else int_reference.forward
    want = reference(str(model.path), x)
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


def test_thread_count_does_not_change_latents(val_patches):
    model = get_model()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch_forward(model, val_patches[:8])
        torch.set_num_threads(max(2, threads))
        many = torch_forward(model, val_patches[:8])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("weights", [MODELS["fast"].weights, RETIRED[0].weights,
                                     next(e for e in RETIRED if isinstance(e.config, IDFConfig)).weights])
def test_inverse_undoes_forward(val_patches, hard_patches, weights):
    model = get_model(WEIGHTS_DIR / weights)
    x = np.concatenate([val_patches[:4], hard_patches])
    outs, priors, top = model.flow.forward(torch.from_numpy(x))
    z = top
    for level in reversed(range(model.config.levels)):
        if level < model.config.levels - 1:
            z = torch.cat([z, outs[level].to(z.dtype)], dim=1)
        z = model.flow.decode_level(level, z)
    np.testing.assert_array_equal(model.flow.to_pixels(z).numpy().astype(np.uint8), x)


def lift_53(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """JPEG 2000's reversible 5/3 along ``axis`` with whole-sample symmetric extension: (low, high)."""
    x = np.moveaxis(x, axis, -1).astype(np.int64)
    even, odd = x[..., 0::2], x[..., 1::2]
    right = np.concatenate([even[..., 1:], even[..., -1:]], axis=-1)  # x[2n+2], x[N] = x[N-2]
    high = odd - (even + right) // 2
    left = np.concatenate([high[..., :1], high[..., :-1]], axis=-1)  # d[-1] = d[0]
    low = even + (left + high + 2) // 4
    return np.moveaxis(low, -1, axis), np.moveaxis(high, -1, axis)


def test_untrained_v2_flow_is_the_integer_5_3_wavelet(tmp_path, val_patches):
    """Zero-initialized residuals: the v2 flow starts as JPEG 2000's reversible transform in YCoCg-R."""
    from wsi_idf.model.export import export_model, new_float_model
    from wsi_idf.coding.model_file import load_coding_model
    model = load_coding_model(export_model(new_float_model(WaveletConfig()), tmp_path, "untrained"))
    outs, _, _, _ = torch_forward(model, val_patches[:2])
    r, g, b = (val_patches[:2, i].astype(np.int64) for i in range(3))
    co = r - b
    t = b + co // 2
    cg = g - t
    image = np.stack([t + cg // 2 - 128, co, cg], axis=1)
    low_h, high_h = lift_53(image, axis=3)  # rows first
    (hl, hh), (_, lh) = lift_53(high_h, axis=2), lift_53(low_h, axis=2)  # then columns
    np.testing.assert_array_equal(outs[0], np.concatenate([hl, lh, hh], axis=1))


def test_integer_model_codes_close_to_float_model(val_patches):
    """Export must not lose much: the integer model's NLL stays within 3% of the float model's."""
    model = get_model()
    float_model = load_float_model(model.path).eval()
    with torch.no_grad():
        float_bits = float(float_model(torch.from_numpy(val_patches))[0].sum())
    int_bits = float(ideal_bits(val_patches, model).sum())
    assert int_bits <= 1.03 * float_bits, (int_bits, float_bits)


@pytest.mark.parametrize("seed", range(6))
def test_one_layer_matches_int64_at_its_exactness_bound(seed):
    """A layer alone, at the edges the model file allows: shifts of either sign (folded into the
    weights as powers of two), sums right below 2**24, and layers wide enough to sum input groups
    in float64, against the independent int64 layer."""
    from wsi_idf.coding.integer_flow import EXACT_FLOAT32, IntConv
    rng = np.random.default_rng(seed)
    cin, cout, k = [(6, 32, 3), (32, 32, 3), (32, 32, 1), (32, 18, 3), (300, 8, 3), (1200, 4, 1)][seed]
    max_input = 256  # |input| of a first layer: -256 .. 255
    weight = rng.integers(-127, 128, (cout, cin, k, k))
    weight[:, :, 0, 0] = 127 * np.sign(weight[:, :, 0, 0] + 0.5)  # large fan-in sums
    room = EXACT_FLOAT32 - 1 - np.abs(weight).sum(axis=(1, 2, 3)).clip(max=EXACT_FLOAT32 // max_input) * max_input
    bias = (rng.integers(0, 2, cout) * 2 - 1) * np.maximum(room, 0).clip(max=EXACT_FLOAT32 - 1) // 2
    shift = rng.integers(-3, 25, cout)
    layer = IntConv.build(weight, bias, shift, max_input=max_input)
    assert (layer.input_groups is not None) == (cin >= 300)
    x = rng.choice([-256, -255, 0, 1, 254, 255], (2, cin, 7, 7)).astype(np.int64)
    x[:, :, 3, 3] = -max_input  # one output's every input at the extreme
    t = {"l.weight": weight.astype(np.int8), "l.bias": bias, "l.shift": shift}
    expected = int_reference.layer(t, "l", x)
    got = layer(torch.from_numpy(x.astype(np.float32)))
    np.testing.assert_array_equal(got.numpy().astype(np.int64), expected)
