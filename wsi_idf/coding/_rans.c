/* wsi_idf.coding._rans: a compiled twin of the constriction calls that write patch format 3.
 *
 * It writes and reads the same words as `wsi_idf.coding.entropy.push` / `pop` on a
 * `constriction.stream.stack.AnsCoder` (constriction's stack rANS: 64-bit state starting at 0,
 * 32-bit words, 24-bit precision, state words appended low word first), with constriction's
 * re-quantized ("leaky") tables given by the caller. It adds no format: it only codes many
 * streams per call, so that the Python around the calls stops costing more than the coding.
 *
 * A stream is a sequence of pushes ("segments"), popped first segment first. Within a segment,
 * the values are popped grouped by table row (ascending, positions ascending within a row), then
 * the escaped values as 16-bit uniform symbols (positions ascending); encoding runs the exact
 * reverse. Values are int64; rows index `cum`, a (rows, alphabet + 1) table of left cumulative
 * frequencies (the last column is 2**24); the last symbol of a row is the escape.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PRECISION 24
#define ESCAPE_FREQ (1u << (PRECISION - 16))
#define ESCAPE_OFFSET 32768

typedef struct {
    const uint32_t *cum;
    int64_t rows, alphabet, window;
} Tables;

/* the symbol of value v with centre c: its offset in the window, or the escape */
static inline int64_t symbol_of(const Tables *t, int64_t v, int64_t c) {
    int64_t off = v - c + t->window;
    return (off < 0 || off >= t->alphabet - 1) ? t->alphabet - 1 : off;
}

/* counting sort of positions [0, n) by row, stable; order must hold n entries, count rows + 1 */
static int sort_by_row(const int64_t *rows, int64_t n, const Tables *t, int64_t *order, int64_t *count) {
    memset(count, 0, (size_t)(t->rows + 1) * sizeof(int64_t));
    for (int64_t i = 0; i < n; i++) {
        if (rows[i] < 0 || rows[i] >= t->rows) return -1;
        count[rows[i] + 1]++;
    }
    for (int64_t r = 0; r < t->rows; r++) count[r + 1] += count[r];
    for (int64_t i = 0; i < n; i++) order[count[rows[i]]++] = i;
    return 0;
}

typedef struct {
    uint64_t state;
    uint32_t *out;
    int64_t words, cap;
} Encoder;

static inline int encode_symbol(Encoder *e, uint32_t start, uint32_t freq) {
    if ((e->state >> (64 - PRECISION)) >= freq) {
        if (e->words >= e->cap) return -1;
        e->out[e->words++] = (uint32_t)e->state;
        e->state >>= 32;
    }
    e->state = ((e->state / freq) << PRECISION) | (start + (uint32_t)(e->state % freq));
    return 0;
}

/* encode_streams(values, rows, centres, streams, length, order, segment_ends, cum, alphabet, window, out,
 * word_counts) -> total words written to out (uint32), or raises. Stream s codes values[s, order[k]] for k
 * in [0, len(order)), its segments ending at segment_ends (no copies of the caller's arrays) */
static PyObject *encode_streams(PyObject *self, PyObject *args) {
    Py_buffer vb, rb, cb, xb, sb, tb, ob, wb;
    Py_ssize_t streams, length, alphabet, window;
    if (!PyArg_ParseTuple(args, "y*y*y*nny*y*y*nnw*w*", &vb, &rb, &cb, &streams, &length, &xb, &sb, &tb, &alphabet,
                          &window, &ob, &wb))
        return NULL;
    Tables t = {tb.buf, (int64_t)(tb.len / 4 / (alphabet + 1)), alphabet, window};
    const int64_t *values = vb.buf, *rows = rb.buf, *centres = cb.buf, *ends = sb.buf, *picks = xb.buf;
    int64_t segments = sb.len / 8, *word_counts = wb.buf, coded = xb.len / 8;
    int64_t *seg_rows = malloc((size_t)(coded + 1) * sizeof(int64_t));
    Encoder e = {0, ob.buf, 0, (int64_t)(ob.len / 4)};
    int64_t *order = malloc((size_t)(length + 1) * sizeof(int64_t));
    int64_t *count = malloc((size_t)(t.rows + 1) * sizeof(int64_t));
    const char *error = NULL;
    if (vb.len < streams * length * 8 || rb.len < vb.len || cb.len < vb.len || wb.len < streams * 8)
        error = "encode_streams: arrays are shorter than streams x length";
    else if (!order || !count || !seg_rows)
        error = "encode_streams: out of memory";
    else if (segments < 1 || ends[segments - 1] != coded)
        error = "encode_streams: the segments do not cover the order";
    for (int64_t k = 0; k < coded && !error; k++)
        if (picks[k] < 0 || picks[k] >= length) error = "encode_streams: order holds a position outside a stream";
    for (int64_t g = 0; g < segments && !error; g++)
        if (ends[g] < (g ? ends[g - 1] : 0)) error = "encode_streams: segment ends decrease";
    Py_BEGIN_ALLOW_THREADS
    for (int64_t s = 0; s < streams && !error; s++) {
        const int64_t *v = values + s * length, *r = rows + s * length, *c = centres + s * length;
        int64_t before = e.words;
        e.state = 0;
        for (int64_t g = segments - 1; g >= 0 && !error; g--) {
            int64_t a = g ? ends[g - 1] : 0, b = ends[g];
            for (int64_t k = b - 1; k >= a; k--) { /* escapes are popped last: pushed first */
                int64_t i = picks[k];
                if (symbol_of(&t, v[i], c[i]) != alphabet - 1) continue;
                int64_t raw = v[i] + ESCAPE_OFFSET;
                if (raw < 0 || raw >= 65536) { error = "encode_streams: a value leaves the escape range"; break; }
                if (encode_symbol(&e, (uint32_t)raw * ESCAPE_FREQ, ESCAPE_FREQ)) { error = "full"; break; }
            }
            if (error) break;
            for (int64_t k = a; k < b; k++) seg_rows[k - a] = r[picks[k]];
            if (sort_by_row(seg_rows, b - a, &t, order, count)) { error = "encode_streams: a row is outside the table"; break; }
            for (int64_t k = b - a - 1; k >= 0; k--) {
                int64_t i = picks[a + order[k]];
                const uint32_t *row = t.cum + r[i] * (alphabet + 1);
                int64_t sym = symbol_of(&t, v[i], c[i]);
                if (encode_symbol(&e, row[sym], row[sym + 1] - row[sym])) { error = "full"; break; }
            }
        }
        if (error) break;
        /* constriction appends the state's words, least significant first, without leading zero words */
        if (e.state) {
            if (e.words + 2 > e.cap) { error = "full"; break; }
            e.out[e.words++] = (uint32_t)e.state;
            if (e.state >> 32) e.out[e.words++] = (uint32_t)(e.state >> 32);
        }
        word_counts[s] = e.words - before;
    }
    Py_END_ALLOW_THREADS
    free(order);
    free(count);
    free(seg_rows);
    PyBuffer_Release(&vb); PyBuffer_Release(&rb); PyBuffer_Release(&cb); PyBuffer_Release(&xb); PyBuffer_Release(&sb);
    PyBuffer_Release(&tb); PyBuffer_Release(&ob); PyBuffer_Release(&wb);
    if (error) {
        PyErr_SetString(strcmp(error, "full") ? PyExc_ValueError : PyExc_OverflowError,
                        strcmp(error, "full") ? error : "encode_streams: the output buffer is full");
        return NULL;
    }
    return PyLong_FromLongLong(e.words);
}

/* start_decoders(words, starts, ends, states, positions, failed): constriction's from_compressed for each
 * stream words[starts[i]:ends[i]]: the state is read from the end; a trailing zero word is damage */
static PyObject *start_decoders(PyObject *self, PyObject *args) {
    Py_buffer wb, ab, eb, sb, pb, fb;
    if (!PyArg_ParseTuple(args, "y*y*y*w*w*w*", &wb, &ab, &eb, &sb, &pb, &fb)) return NULL;
    const uint32_t *words = wb.buf;
    const int64_t *starts = ab.buf, *ends = eb.buf;
    uint64_t *states = sb.buf;
    int64_t *positions = pb.buf, n = ab.len / 8, total = wb.len / 4;
    uint8_t *failed = fb.buf;
    for (int64_t i = 0; i < n; i++) {
        int64_t p = ends[i];
        states[i] = 0;
        if (starts[i] < 0 || p > total || p < starts[i]) { failed[i] = 1; positions[i] = starts[i]; continue; }
        if (p > starts[i]) {
            uint32_t first = words[--p];
            if (!first) failed[i] = 1;
            uint64_t state = first;
            while (p > starts[i]) {
                state = (state << 32) | words[--p];
                if (state >> 32) break;
            }
            states[i] = state;
        }
        positions[i] = p;
    }
    PyBuffer_Release(&wb); PyBuffer_Release(&ab); PyBuffer_Release(&eb);
    PyBuffer_Release(&sb); PyBuffer_Release(&pb); PyBuffer_Release(&fb);
    Py_RETURN_NONE;
}

/* pop_segment(words, starts, states, positions, failed, rows, centres, streams, length, order, cum, buckets,
 * alphabet, window, values): pop one segment from each stream that has not failed: the values at positions
 * order[k] of each stream's row in rows, centres and values (streams, length). `buckets` (rows, BUCKETS + 1,
 * uint16) gives, per slice of the 24-bit range, the symbol its first quantile falls in: the search for a
 * quantile's symbol then starts between two buckets' symbols instead of over the whole row. */
#define BUCKET_SHIFT 14
#define BUCKETS (1 << (PRECISION - BUCKET_SHIFT))
static PyObject *pop_segment(PyObject *self, PyObject *args) {
    Py_buffer wb, ab, sb, pb, fb, rb, cb, xb, tb, kb, vb;
    Py_ssize_t streams, length, alphabet, window;
    if (!PyArg_ParseTuple(args, "y*y*w*w*y*y*y*nny*y*y*nnw*", &wb, &ab, &sb, &pb, &fb, &rb, &cb, &streams, &length,
                          &xb, &tb, &kb, &alphabet, &window, &vb))
        return NULL;
    Tables t = {tb.buf, (int64_t)(tb.len / 4 / (alphabet + 1)), alphabet, window};
    const uint32_t *words = wb.buf;
    const uint16_t *buckets = kb.buf;
    const int64_t *starts = ab.buf, *rows = rb.buf, *centres = cb.buf, *picks = xb.buf;
    uint64_t *states = sb.buf;
    int64_t *positions = pb.buf, *values = vb.buf, coded = xb.len / 8;
    uint8_t *failed = fb.buf;
    const char *error = NULL;
    int64_t *order = malloc((size_t)(coded + 1) * sizeof(int64_t));
    int64_t *seg_rows = malloc((size_t)(coded + 1) * sizeof(int64_t));
    int64_t *count = malloc((size_t)(t.rows + 1) * sizeof(int64_t));
    if (rb.len < streams * length * 8 || cb.len < rb.len || vb.len < rb.len || sb.len < streams * 8
        || pb.len < streams * 8 || fb.len < streams || ab.len < streams * 8)
        error = "pop_segment: arrays are shorter than streams x length";
    else if (kb.len < t.rows * (BUCKETS + 1) * 2)
        error = "pop_segment: the bucket table is short";
    else if (!order || !count || !seg_rows)
        error = "pop_segment: out of memory";
    for (int64_t k = 0; k < coded && !error; k++)
        if (picks[k] < 0 || picks[k] >= length) error = "pop_segment: order holds a position outside a stream";
    const uint64_t mask = (1ull << PRECISION) - 1;
    Py_BEGIN_ALLOW_THREADS
    for (int64_t s = 0; s < streams && !error; s++) {
        if (failed[s]) continue;
        const int64_t *r = rows + s * length, *c = centres + s * length;
        int64_t *v = values + s * length, p = positions[s], start = starts[s];
        uint64_t state = states[s];
        for (int64_t k = 0; k < coded; k++) seg_rows[k] = r[picks[k]];
        if (sort_by_row(seg_rows, coded, &t, order, count)) { error = "pop_segment: a row is outside the table"; break; }
        int64_t escaped = 0;
        for (int64_t k = 0; k < coded; k++) {
            int64_t i = picks[order[k]], ri = seg_rows[order[k]];
            const uint32_t *row = t.cum + ri * (alphabet + 1);
            const uint16_t *bucket = buckets + ri * (BUCKETS + 1);
            uint32_t q = (uint32_t)(state & mask);
            int64_t lo = bucket[q >> BUCKET_SHIFT], hi = (int64_t)bucket[(q >> BUCKET_SHIFT) + 1] + 1;
            if (hi > alphabet) hi = alphabet;
            while (hi - lo > 1) { int64_t mid = (lo + hi) >> 1; if (row[mid] <= q) lo = mid; else hi = mid; }
            state = (state >> PRECISION) * (row[lo + 1] - row[lo]) + (q - row[lo]);
            if (!(state >> 32) && p > start) state = (state << 32) | words[--p];
            if (lo == alphabet - 1) { escaped++; v[i] = INT64_MIN; } else v[i] = lo - window + c[i];
        }
        for (int64_t k = 0; escaped && k < coded; k++) { /* escapes in the segment's order */
            int64_t i = picks[k];
            if (v[i] != INT64_MIN) continue;
            uint32_t q = (uint32_t)(state & mask), sym = q / ESCAPE_FREQ;
            state = (state >> PRECISION) * ESCAPE_FREQ + (q - sym * ESCAPE_FREQ);
            if (!(state >> 32) && p > start) state = (state << 32) | words[--p];
            v[i] = (int64_t)sym - ESCAPE_OFFSET;
            escaped--;
        }
        states[s] = state;
        positions[s] = p;
    }
    Py_END_ALLOW_THREADS
    free(order);
    free(seg_rows);
    free(count);
    PyBuffer_Release(&wb); PyBuffer_Release(&ab); PyBuffer_Release(&sb); PyBuffer_Release(&pb);
    PyBuffer_Release(&fb); PyBuffer_Release(&rb); PyBuffer_Release(&cb); PyBuffer_Release(&xb);
    PyBuffer_Release(&tb); PyBuffer_Release(&kb); PyBuffer_Release(&vb);
    if (error) {
        PyErr_SetString(PyExc_ValueError, error);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"encode_streams", encode_streams, METH_VARARGS, "Push segments of values onto fresh streams (constriction's words)."},
    {"start_decoders", start_decoders, METH_VARARGS, "Read each stream's initial state, as constriction does."},
    {"pop_segment", pop_segment, METH_VARARGS, "Pop one segment of values from each stream."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rans", "Compiled twin of wsi-idf's constriction calls.",
                                    -1, methods};

PyMODINIT_FUNC PyInit__rans(void) { return PyModule_Create(&module); }
