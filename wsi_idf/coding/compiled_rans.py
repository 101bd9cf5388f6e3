"""Many rANS streams per call: the compiled twin (``_rans.c``) of ``entropy.push`` / ``entropy.pop``.

It writes and reads exactly the words constriction does (patch format 3 is unchanged; the tests
compare both on real latents, escapes and damaged streams), but codes a whole batch's streams
in one call instead of one call per table row, pass and patch. When the extension is not built
(a source checkout on another Python, say), ``AVAILABLE`` is False and callers use constriction.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..config import PROB_BITS

try:
    from ._rans import encode_streams as _encode_streams, pop_segment as _pop_segment, start_decoders as _start
    AVAILABLE = True
except ImportError:  # not compiled here: constriction does the same work, slower
    AVAILABLE = False


def quantized_cdf(freq: np.ndarray) -> np.ndarray:
    """constriction's cumulative table for ``Categorical(freq / 2**PROB_BITS, perfect=False)``.

    constriction re-quantizes even exact probabilities: each symbol gets one unit, and the other
    ``2**PROB_BITS - n`` units are shared as ``floor(C * (2**PROB_BITS - n) / 2**PROB_BITS)`` of
    the stored cumulative ``C``. Exact in integers (the floats it uses are exact on these values).
    Returns uint32 (rows, n + 1), the last column ``2**PROB_BITS``.
    """
    freq = np.asarray(freq, dtype=np.int64)
    rows, n = freq.shape
    left = np.zeros((rows, n + 1), dtype=np.int64)
    left[:, 1:] = np.cumsum(freq, axis=1)
    cdf = (left * (2**PROB_BITS - n) >> PROB_BITS) + np.arange(n + 1)
    cdf[:, n] = 2**PROB_BITS
    return cdf.astype(np.uint32)


BUCKET_SHIFT = 14  # as in _rans.c: the 24-bit range in 1,024 slices


@dataclass(frozen=True)
class CompiledTables:
    """A table set in the form ``_rans`` reads: constriction's quantized cumulative frequencies, and
    per slice of the range the symbol its first quantile falls in (decoding searches from there)."""
    cdf: np.ndarray  # uint32 (rows, alphabet + 1)
    window: int

    @property
    def alphabet(self) -> int:
        return self.cdf.shape[1] - 1

    @functools.cached_property
    def buckets(self) -> np.ndarray:
        starts = np.arange(2 ** (PROB_BITS - BUCKET_SHIFT) + 1, dtype=np.int64) << BUCKET_SHIFT
        found = np.stack([np.searchsorted(row, starts, side="right") - 1 for row in self.cdf.astype(np.int64)])
        return np.ascontiguousarray(np.minimum(found, self.alphabet - 1), dtype=np.uint16)


def _int64(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.int64)


def encode_streams(tables: CompiledTables, values: np.ndarray, rows: np.ndarray, centres: np.ndarray,
                   segments: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """One stream per row of ``values`` (streams, length). Each segment (the positions of one push, in
    order; default: all) is one ``entropy.push``, the last segment first, so they pop first segment
    first. Values must lie inside the escape range. Returns each stream's uint32 words."""
    values, rows, centres = _int64(values), _int64(rows), _int64(centres)
    streams, length = values.shape
    segments = [np.arange(length)] if segments is None else segments
    order = _int64(np.concatenate(segments))
    ends = _int64(np.cumsum([len(s) for s in segments]))
    counts = np.zeros(streams, dtype=np.int64)
    # a symbol writes at most one word, an escaped one two; np.empty leaves the unwritten pages untouched
    out = np.empty(2 * streams * len(order) + 2 * streams + 16, dtype=np.uint32)
    total = _encode_streams(values, rows, centres, streams, length, order, ends, tables.cdf, tables.alphabet,
                            tables.window, out, counts)
    return np.split(out[:total], np.cumsum(counts)[:-1])


class StreamDecoders:
    """One rANS decoder per stream, popped segment by segment (``entropy.pop``'s mirror, batched).

    ``damaged`` flags the streams constriction would refuse (a trailing zero word); popping skips them.
    """

    def __init__(self, streams: list[np.ndarray | None]):
        sizes = np.array([0 if s is None else len(s) for s in streams], dtype=np.int64)
        self.words = np.concatenate([np.zeros(0, np.uint32), *(s for s in streams if s is not None)]).astype(np.uint32)
        self.ends = np.cumsum(sizes)
        self.starts = self.ends - sizes
        self.states = np.zeros(len(streams), dtype=np.uint64)
        self.positions = np.zeros(len(streams), dtype=np.int64)
        self.damaged = np.array([s is None for s in streams], dtype=np.uint8)
        _start(self.words, self.starts, self.ends, self.states, self.positions, self.damaged)

    def pop(self, tables: CompiledTables, rows: np.ndarray, centres: np.ndarray,
            positions: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Pop one segment from every stream: the values at ``positions`` (default: all) of each row of
        ``rows``/``centres`` (streams, length), written into ``out`` (int64, the same shape; damaged
        streams are left as they are) and returned."""
        rows, centres = _int64(rows), _int64(centres)
        out = np.zeros(rows.shape, dtype=np.int64) if out is None else out
        if out.dtype != np.int64 or not out.flags.c_contiguous or out.shape != rows.shape:
            raise ValueError("out must be C-contiguous int64 of the rows' shape")
        positions = _int64(np.arange(rows.shape[1]) if positions is None else positions)
        _pop_segment(self.words, self.starts, self.states, self.positions, self.damaged, rows, centres,
                     rows.shape[0], rows.shape[1], positions, tables.cdf, tables.buckets, tables.alphabet,
                     tables.window, out)
        return out

    def is_empty(self) -> np.ndarray:
        """Per stream, whether all its data was read (constriction's ``is_empty``: the state is 0)."""
        return self.states == 0
