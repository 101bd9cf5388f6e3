"""rANS entropy coding of integer latents with table-indexed probabilities (constriction).

Two calls, as in CompressAI: ``push`` values with their (row, centre) priors onto an ANS
stack, ``pop`` them back with the same priors. Each prior is a row of integer frequencies
over a window of offsets around a centre, plus an escape symbol; escaped values follow
as 16-bit uniform symbols. Symbols sharing a row are coded in one call with one
prebuilt constriction model, which keeps Python overhead per patch small.

This is the reference coder; ``compiled_rans`` writes and reads the same words for a whole batch
per call, and wsi-idf uses it whenever its extension is built.
"""
from __future__ import annotations

import functools

import constriction
import numpy as np

from .compiled_rans import CompiledTables, quantized_cdf
from ..config import ESCAPE_BITS, PROB_BITS

_ESCAPE_MODEL = constriction.stream.model.Uniform(2**ESCAPE_BITS)
_ESCAPE_OFFSET = 2 ** (ESCAPE_BITS - 1)
LATENT_RANGE = _ESCAPE_OFFSET - 1  # |value| the escape symbols can hold


class TableModels:
    """One prebuilt categorical model per table row (integer frequencies summing to 2**PROB_BITS)."""

    def __init__(self, freq: np.ndarray):
        freq = np.asarray(freq, dtype=np.int64)
        if (freq.sum(axis=1) != 2**PROB_BITS).any() or (freq < 1).any():
            raise ValueError("frequency rows must be >= 1 and sum to 2**PROB_BITS")
        self.freq = freq
        self.window = (freq.shape[1] - 2) // 2
        self.escape = freq.shape[1] - 1
        probs = freq.astype(np.float64) / 2**PROB_BITS  # exact: dyadic rationals
        self.models = [constriction.stream.model.Categorical(p, perfect=False) for p in probs]
        self.bits = -np.log2(probs)  # information content, for NLL reports only
        # the most likely value of each row, as an offset from its centre (progressive previews)
        self.mode_offsets = np.argmax(freq[:, : 2 * self.window + 1], axis=1).astype(np.int64) - self.window

    @functools.cached_property
    def compiled(self) -> CompiledTables:
        """The same models as constriction quantizes them, for the compiled coder (``compiled_rans``)."""
        return CompiledTables(quantized_cdf(self.freq), self.window)

    def ideal_bits(self, values: np.ndarray, rows: np.ndarray, centres: np.ndarray) -> float:
        """Code length the tables assign to ``values`` (what an ideal entropy coder would write)."""
        symbols, escaped = self.symbols(values, centres)
        return float(self.bits[rows, symbols].sum() + ESCAPE_BITS * escaped.sum())

    def symbols(self, values: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        offsets = values - centres + self.window
        escaped = (offsets < 0) | (offsets > 2 * self.window)
        return np.where(escaped, self.escape, offsets).astype(np.int32), escaped


def _groups(rows: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(row, positions) for each distinct row in ascending order; positions in ascending order."""
    # table rows fit 16 bits: numpy's stable sort of int16 is a radix sort (~5x faster on a patch's rows)
    order = np.argsort(rows.astype(np.int16) if rows.max(initial=0) < 2**15 else rows, kind="stable")
    sorted_rows = rows[order]
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(sorted_rows)) + 1, [len(rows)]])
    return [(int(sorted_rows[a]), order[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def push(coder: constriction.stream.stack.AnsCoder, tables: TableModels, values: np.ndarray,
         rows: np.ndarray, centres: np.ndarray) -> None:
    """Push 1-D int64 ``values``; ``pop`` with the same rows and centres returns them."""
    symbols, escaped = tables.symbols(values, centres)
    if escaped.any():  # popped last, so pushed first
        coder.encode_reverse((values[escaped] + _ESCAPE_OFFSET).astype(np.int32), _ESCAPE_MODEL)
    for row, positions in reversed(_groups(rows)):
        coder.encode_reverse(symbols[positions], tables.models[row])


def pop(coder: constriction.stream.stack.AnsCoder, tables: TableModels, rows: np.ndarray,
        centres: np.ndarray) -> np.ndarray:
    """Inverse of ``push``: values as int64, in the order of ``rows``."""
    symbols = np.empty(len(rows), dtype=np.int64)
    for row, positions in _groups(rows):
        symbols[positions] = coder.decode(tables.models[row], len(positions))
    values = symbols - tables.window + centres
    escaped = symbols == tables.escape
    if escaped.any():
        values[escaped] = coder.decode(_ESCAPE_MODEL, int(escaped.sum())).astype(np.int64) - _ESCAPE_OFFSET
    return values
