/* A table-indexed rANS coder in C, for measuring only (benchmarks/bench_coders.py): what a small
 * compiled coder with resident tables could do against constriction's per-row calls (issue 13).
 * Not used by wsi-idf: its streams are not a patch format.
 *
 * 64-bit state, 32-bit words, 24-bit probabilities (the precision of wsi-idf's tables). Each symbol
 * is (row, value - centre + window); outside the window it is the escape symbol, followed by the
 * value as a 16-bit uniform symbol. Encoding runs backwards so that decoding runs forwards.
 */
#include <stdint.h>
#include <string.h>

#define PREC 24
#define MASK ((1u << PREC) - 1)

/* cdf: rows x (alphabet + 1) cumulative frequencies; the last symbol of each row is the escape */
int64_t rans_encode(const int64_t *values, const int32_t *rows, const int64_t *centres, int64_t n,
                    const uint32_t *cdf, int32_t alphabet, int32_t window, uint32_t *out, int64_t cap) {
    uint64_t state = 1ull << 32;
    int64_t w = cap; /* words are written from the end of out backwards */
    const int32_t stride = alphabet + 1, escape = alphabet - 1;
    for (int64_t i = n - 1; i >= 0; i--) {
        int64_t off = values[i] - centres[i] + window;
        const uint32_t *c = cdf + (int64_t)rows[i] * stride;
        int32_t s = (off < 0 || off >= escape) ? escape : (int32_t)off;
        if (s == escape) { /* the raw value first (popped after the escape symbol) */
            uint32_t raw = (uint32_t)(values[i] + 32768) & 0xffff, f = 1u << (PREC - 16);
            if ((state >> (64 - PREC)) >= f) { if (w == 0) return -1; out[--w] = (uint32_t)state; state >>= 32; }
            state = ((state / f) << PREC) + state % f + raw * f;
        }
        uint32_t start = c[s], f = c[s + 1] - c[s];
        if ((state >> (64 - PREC)) >= f) { if (w == 0) return -1; out[--w] = (uint32_t)state; state >>= 32; }
        state = ((state / f) << PREC) + state % f + start;
    }
    if (w < 2) return -1;
    out[--w] = (uint32_t)state;
    out[--w] = (uint32_t)(state >> 32);
    int64_t words = cap - w;
    memmove(out, out + w, (size_t)words * 4);
    return words;
}

int64_t rans_decode(const uint32_t *in, int64_t words, const int32_t *rows, const int64_t *centres, int64_t n,
                    const uint32_t *cdf, int32_t alphabet, int32_t window, int64_t *values) {
    if (words < 2) return -1;
    uint64_t state = ((uint64_t)in[0] << 32) | in[1];
    int64_t r = 2;
    const int32_t stride = alphabet + 1, escape = alphabet - 1;
    for (int64_t i = 0; i < n; i++) {
        const uint32_t *c = cdf + (int64_t)rows[i] * stride;
        uint32_t slot = (uint32_t)(state & MASK);
        int32_t lo = 0, hi = alphabet; /* c[lo] <= slot < c[hi] */
        while (hi - lo > 1) { int32_t mid = (lo + hi) >> 1; if (c[mid] <= slot) lo = mid; else hi = mid; }
        state = (uint64_t)(c[lo + 1] - c[lo]) * (state >> PREC) + slot - c[lo];
        if (state < (1ull << 32)) { if (r >= words) return -1; state = (state << 32) | in[r++]; }
        if (lo == escape) {
            uint32_t f = 1u << (PREC - 16), s2 = (uint32_t)(state & MASK) / f;
            state = (uint64_t)f * (state >> PREC) + (uint32_t)(state & MASK) - s2 * f;
            if (state < (1ull << 32)) { if (r >= words) return -1; state = (state << 32) | in[r++]; }
            values[i] = (int64_t)s2 - 32768;
        } else {
            values[i] = lo - window + centres[i];
        }
    }
    return r == words && state == (1ull << 32) ? 0 : -2;
}
