"""rANS with table priors: exact round trips, escapes, and overhead against the ideal code length."""
from __future__ import annotations

import constriction
import numpy as np
from hypothesis import given, settings, strategies as st

from wsi_idf.config import PROB_BITS
from wsi_idf.coding.entropy import TableModels, pop, push
from wsi_idf.model.tables import split_table, to_frequencies


def roundtrip(tables, values, rows, centres):
    coder = constriction.stream.stack.AnsCoder()
    push(coder, tables, values, rows, centres)
    words = coder.get_compressed()
    decoder = constriction.stream.stack.AnsCoder(words)
    out = pop(decoder, tables, rows, centres)
    assert decoder.is_empty()
    return out, 32 * len(words)


def test_frequencies_are_exact_and_positive():
    freq = split_table()
    assert (freq >= 1).all() and (freq.sum(axis=1) == 2**PROB_BITS).all()
    np.testing.assert_array_equal(to_frequencies(np.array([[0.0, 1.0, 0.0]]))[0], [1, 2**PROB_BITS - 2, 1])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 3000), spread=st.sampled_from([1, 10, 100, 30000]))
def test_roundtrip_with_escapes(seed, n, spread):
    rng = np.random.default_rng(seed)
    tables = TableModels(to_frequencies(rng.random((7, 2 * 15 + 2)) + 1e-3))
    rows = rng.integers(0, 7, n)
    centres = rng.integers(-50, 50, n)
    values = np.clip(centres + rng.integers(-spread, spread + 1, n), -2**15, 2**15 - 1)
    out, _ = roundtrip(tables, values, rows, centres)
    np.testing.assert_array_equal(out, values)


def test_overhead_within_one_percent_of_ideal():
    rng = np.random.default_rng(0)
    tables = TableModels(split_table())
    n = 20000
    rows = rng.integers(0, tables.escape, n) % len(tables.models)
    centres = rng.integers(-100, 100, n)
    values = centres + np.round(rng.logistic(0, 3, n)).astype(np.int64)
    out, bits = roundtrip(tables, values, rows, centres)
    np.testing.assert_array_equal(out, values)
    assert bits <= 1.01 * tables.ideal_bits(values, rows, centres) + 64
