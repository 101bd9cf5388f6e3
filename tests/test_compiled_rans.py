"""The compiled coder (``compiled_rans``) writes and reads exactly what constriction does.

Patch format 3 is constriction's words: the compiled twin must match them word for word on
every table, escapes, several pushes per stream and damaged streams, and decode what
constriction wrote. Without the extension, wsi-idf codes the same bytes with constriction.
"""
from __future__ import annotations

import constriction
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from wsi_idf.coding import compiled_rans, latent_streams
from wsi_idf.coding.batch import decode_patches, encode_patches
from wsi_idf.coding.entropy import TableModels, pop, push
from wsi_idf.coding.registry import MODELS, RETIRED, WEIGHTS_DIR, get_model
from wsi_idf.model.tables import to_frequencies

pytestmark = pytest.mark.skipif(not compiled_rans.AVAILABLE, reason="wsi_idf.coding._rans is not built "
                                "(pip install -e . compiles it)")


def constriction_streams(tables: TableModels, values, rows, centres, segments) -> list[np.ndarray]:
    """What wsi-idf writes with constriction: per stream, the segments pushed last first."""
    out = []
    for v, r, c in zip(values, rows, centres):
        coder = constriction.stream.stack.AnsCoder()
        for positions in reversed(segments):
            push(coder, tables, v[positions], r[positions], c[positions])
        out.append(coder.get_compressed())
    return out


def probe_cdf(tables: TableModels, row: int) -> np.ndarray:
    """constriction's own left cumulative of every symbol of a row: a fresh coder (state 0) that
    codes one symbol holds exactly its left cumulative."""
    cdf = []
    for s in range(tables.escape + 1):
        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(np.array([s], dtype=np.int32), tables.models[row])
        words = coder.get_compressed()
        cdf.append(int(words[0]) if len(words) else 0)
    return np.array(cdf)


def test_the_quantized_tables_are_constrictions_for_every_shipped_model():
    for weights in sorted({e.weights for e in (*MODELS.values(), *RETIRED)}):
        for tables in get_model(WEIGHTS_DIR / weights).tables:
            compiled = tables.compiled.cdf
            assert compiled.dtype == np.uint32 and (compiled[:, -1] == 2**24).all()
            assert (np.diff(compiled.astype(np.int64), axis=1) >= 1).all()
            for row in range(0, len(tables.models), max(1, len(tables.models) // 24)):
                np.testing.assert_array_equal(compiled[row, :-1], probe_cdf(tables, row))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), streams=st.integers(1, 5), length=st.integers(1, 400),
       passes=st.integers(1, 3), spread=st.sampled_from([1, 10, 100, 30000]))
def test_words_equal_constriction_with_escapes_and_passes(seed, streams, length, passes, spread):
    rng = np.random.default_rng(seed)
    tables = TableModels(to_frequencies(rng.random((7, 2 * 15 + 2)) ** 4 + 1e-4))
    rows = rng.integers(0, 7, (streams, length))
    centres = rng.integers(-50, 50, (streams, length))
    values = np.clip(centres + rng.integers(-spread, spread + 1, (streams, length)), -2**15 + 1, 2**15 - 1)
    segments = np.array_split(rng.permutation(length), passes)
    expected = constriction_streams(tables, values, rows, centres, segments)
    got = compiled_rans.encode_streams(tables.compiled, values, rows, centres, segments)
    assert [w.tolist() for w in got] == [w.tolist() for w in expected]
    decoders = compiled_rans.StreamDecoders(expected)  # reads constriction's words
    assert not decoders.damaged.any()
    for positions in segments:
        popped = decoders.pop(tables.compiled, rows[:, positions], centres[:, positions])
        np.testing.assert_array_equal(popped, values[:, positions])
    assert decoders.is_empty().all()


def test_damaged_and_empty_streams_are_flagged_as_constriction_does():
    tables = TableModels(to_frequencies(np.random.default_rng(0).random((3, 32)) + 0.1))
    values = np.zeros((1, 50), dtype=np.int64)
    rows = np.zeros_like(values)
    (words,) = compiled_rans.encode_streams(tables.compiled, values + 3, rows, values, None)
    with pytest.raises(Exception):
        constriction.stream.stack.AnsCoder(np.append(words, np.uint32(0)))  # constriction refuses a trailing 0
    decoders = compiled_rans.StreamDecoders([np.append(words, np.uint32(0)), None, np.zeros(0, np.uint32), words])
    assert decoders.damaged.tolist() == [1, 1, 0, 0]
    popped = decoders.pop(tables.compiled, np.zeros((4, 50), np.int64), np.zeros((4, 50), np.int64))
    assert (popped[:2] == 0).all() and (popped[3] == 3).all()
    assert decoders.is_empty()[3]


def test_latent_streams_write_the_same_payloads_either_way(val_patches, monkeypatch):
    patches = val_patches[::80][:6]
    for weights in sorted({e.weights for e in (*MODELS.values(), *RETIRED)}):  # v1 and v2 flows
        streams = latent_streams.LatentStreams(get_model(WEIGHTS_DIR / weights))
        latents = streams.latents(patches)
        compiled = streams.encode_batch(latents)
        assert compiled == [streams.encode(latents, i) for i in range(len(patches))]


def test_patches_round_trip_and_match_without_the_extension(val_patches, hard_patches, monkeypatch):
    patches = np.concatenate([val_patches[::50][:10], hard_patches])  # hard ones escape, or are stored plain
    compiled = encode_patches(patches)
    np.testing.assert_array_equal(decode_patches(compiled), patches)
    monkeypatch.setattr(compiled_rans, "AVAILABLE", False)
    assert encode_patches(patches) == compiled
    np.testing.assert_array_equal(decode_patches(compiled), patches)
