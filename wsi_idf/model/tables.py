"""Integer probability tables for the priors, built once at export and stored with the weights.

Coding never evaluates a transcendental function: the decoder reads the same integer
frequencies the encoder used. This module is only called when a model is exported.
"""
from __future__ import annotations

import numpy as np

from ..config import (LOG_SCALE_STEP, MEAN_STEPS, NUM_SCALES, PROB_BITS, SCALE_MIN, SPLIT_WINDOW, TOP_WINDOW)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def logistic_mass(values: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """P(v) of a discretized logistic at integer offsets ``values`` (float64)."""
    return _sigmoid((values + 0.5 - mean) / scale) - _sigmoid((values - 0.5 - mean) / scale)


def to_frequencies(probs: np.ndarray, bits: int = PROB_BITS, deterministic: bool = False) -> np.ndarray:
    """Quantize each row of probabilities to integers >= 1 summing exactly to 2**bits.

    The rounding remainder goes to the row's most probable symbol. ``deterministic`` picks it
    from the integer frequencies, the first of equals, so that two symbols of equal mass (a
    symmetric row) cannot swap on a machine whose ``tanh`` differs in the last bit; model v1
    files were exported with the float argmax and keep it, to stay byte-identical.
    """
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(axis=-1, keepdims=True)
    n = probs.shape[-1]
    total = 2**bits
    freq = np.floor(probs * (total - n)).astype(np.int64) + 1
    deficit = total - freq.sum(axis=-1)
    # hand the rounding remainder to each row's most probable symbol
    rows = np.arange(probs.shape[0])
    freq[rows, (freq if deterministic else probs).argmax(axis=-1)] += deficit
    assert (freq >= 1).all() and (freq.sum(axis=-1) == total).all()
    return freq.astype(np.int32)


def split_table(deterministic: bool = False) -> np.ndarray:
    """Rows indexed by ``scale_index * MEAN_STEPS + mean_fraction``; columns are offsets
    -W..W from the centre, then one escape symbol holding the mass outside the window."""
    offsets = np.arange(-SPLIT_WINDOW, SPLIT_WINDOW + 1, dtype=np.float64)
    scales = SCALE_MIN * np.exp(np.arange(NUM_SCALES) * LOG_SCALE_STEP)
    means = np.arange(MEAN_STEPS) / MEAN_STEPS
    mass = logistic_mass(offsets[None, None, :], means[None, :, None], scales[:, None, None])
    escape = np.clip(1.0 - mass.sum(-1, keepdims=True), 0.0, None)
    probs = np.concatenate([mass, escape], axis=-1).reshape(NUM_SCALES * MEAN_STEPS, -1)
    return to_frequencies(probs, deterministic=deterministic)


def top_table(mean: np.ndarray, log_scale: np.ndarray, logits: np.ndarray,
              deterministic: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel tables of the top logistic mixture: (centres (C,), frequencies (C, 2W+2))."""
    mean, scale = np.asarray(mean, np.float64), np.exp(np.asarray(log_scale, np.float64))
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights = weights / weights.sum(-1, keepdims=True)
    centres = np.round((weights * mean).sum(-1)).astype(np.int64)
    values = centres[:, None] + np.arange(-TOP_WINDOW, TOP_WINDOW + 1)[None, :]
    mass = (weights[:, None, :] * logistic_mass(values[..., None], mean[:, None, :], scale[:, None, :])).sum(-1)
    escape = np.clip(1.0 - mass.sum(-1, keepdims=True), 0.0, None)
    return centres, to_frequencies(np.concatenate([mass, escape], axis=-1), deterministic=deterministic)
