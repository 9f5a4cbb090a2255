/* The coarse stage's range scan: every row whose packed code lies within a Hamming radius of the query, with its
 * distance, in one read of the codes. catalog/hamming/memory.py estimates the radius from a sample of the codes
 * (the whole shells a search asks for, with a margin) and cuts the rows found into shells.
 *
 * faiss's range search does the same in about 1.5x the time it takes to read the codes once (1M x 256 bits, one
 * core): it counts bits 64 at a time with POPCNT and files each row into per-query result buffers. Here, on CPUs
 * with AVX2 and codes of a multiple of 32 bytes, four rows are counted at once with the nibble-lookup popcount
 * (VPSHUFB, summed by VPSADBW), their four distances compared with the radius in one instruction, and a row is
 * written out only when it is near: about 1 row in 100. Other CPUs and code lengths take a scalar loop (POPCNT
 * where the CPU has it, chosen when the module loads).
 *
 * Built in place by scripts/build_native.py (scripts/venv.sh runs it); memory.py falls back to faiss without it. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#define HAVE_X86 1
#include <immintrin.h>
#endif

typedef struct {
    int64_t *rows;
    int32_t *distances;
    Py_ssize_t room; /* how many the two arrays hold */
    Py_ssize_t count; /* how many rows are near (may exceed room: the caller asks again with more room) */
} Found;

static inline void keep(Found *found, Py_ssize_t row, unsigned distance) {
    if (found->count < found->room) {
        found->rows[found->count] = row;
        found->distances[found->count] = (int32_t)distance;
    }
    found->count++;
}

static inline uint64_t load_word(const uint8_t *at) {
    uint64_t word;
    memcpy(&word, at, sizeof word); /* (a row need not be 8-byte aligned) */
    return word;
}

static inline unsigned row_distance(const uint8_t *code, const uint8_t *query, Py_ssize_t code_bytes) {
    unsigned distance = 0;
    Py_ssize_t b = 0;
    for (; b + 8 <= code_bytes; b += 8)
        distance += (unsigned)__builtin_popcountll(load_word(code + b) ^ load_word(query + b));
    for (; b < code_bytes; b++)
        distance += (unsigned)__builtin_popcount((unsigned)(code[b] ^ query[b]));
    return distance;
}

#ifdef HAVE_X86
__attribute__((target_clones("popcnt", "default")))
#endif
static void scan_scalar(const uint8_t *codes, Py_ssize_t from, Py_ssize_t rows, Py_ssize_t code_bytes,
                        const uint8_t *query, unsigned radius, Found *found) {
    for (Py_ssize_t row = from; row < rows; row++) {
        unsigned distance = row_distance(codes + row * code_bytes, query, code_bytes);
        if (distance <= radius)
            keep(found, row, distance);
    }
}

#ifdef HAVE_X86
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 8192 /* bench: 4-16 KiB ahead read 1M x 256-bit codes 10-15% faster than the hardware alone; 1 KiB did not */
#endif
#define AVX2_MAX_CHUNKS 31 /* a row's byte counts (<= 8 per 32-byte chunk) are summed in 8 bits before VPSADBW */

/* Rows [0, rows - rows % 4) of codes of `chunks` x 32 bytes; returns where the scalar loop takes over. Inlined
 * into scan_avx2 with `chunks` a constant for 256-bit codes (the default), so that the compiler unrolls it. */
__attribute__((target("avx2,popcnt"), always_inline)) static inline Py_ssize_t
scan_avx2_chunks(const uint8_t *codes, Py_ssize_t rows, Py_ssize_t chunks, const uint8_t *query, unsigned radius,
                 Found *found) {
    const __m256i nibble_bits = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2,
                                                 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low_nibbles = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
    const __m128i limit = _mm_set1_epi16((short)(radius > 0xffff ? 0xffff : radius));
    __m256i query_chunks[AVX2_MAX_CHUNKS];
    for (Py_ssize_t c = 0; c < chunks; c++)
        query_chunks[c] = _mm256_loadu_si256((const __m256i *)(query + 32 * c));
    const Py_ssize_t row_bytes = 32 * chunks, whole = rows - rows % 4;
    for (Py_ssize_t row = 0; row < whole; row += 4) {
        __m256i sums[4];
        /* Ahead of the rows being counted; past the end of the codes near the last rows, which is harmless: a
         * prefetch never faults (the address is formed as an integer, not as a pointer past the array). */
        for (Py_ssize_t line = 0; line < 4 * row_bytes; line += 64)
            _mm_prefetch((const char *)((uintptr_t)codes + (uintptr_t)(row * row_bytes + PREFETCH_BYTES + line)),
                         _MM_HINT_T0);
        for (int r = 0; r < 4; r++) {
            const uint8_t *code = codes + (row + r) * row_bytes;
            __m256i counts = zero;
            for (Py_ssize_t c = 0; c < chunks; c++) {
                __m256i bits = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(code + 32 * c)), query_chunks[c]);
                __m256i low = _mm256_shuffle_epi8(nibble_bits, _mm256_and_si256(bits, low_nibbles));
                __m256i high = _mm256_shuffle_epi8(nibble_bits, _mm256_and_si256(_mm256_srli_epi16(bits, 4), low_nibbles));
                counts = _mm256_add_epi8(counts, _mm256_add_epi8(low, high));
            }
            sums[r] = _mm256_sad_epu8(counts, zero); /* four 64-bit partial sums, each < 2^16 */
        }
        /* Row r's partial sums into 16-bit lane r of each 64-bit lane; adding the four 64-bit lanes gives the four
         * rows' distances as four 16-bit numbers. */
        __m256i packed = _mm256_or_si256(_mm256_or_si256(sums[0], _mm256_slli_epi64(sums[1], 16)),
                                         _mm256_or_si256(_mm256_slli_epi64(sums[2], 32), _mm256_slli_epi64(sums[3], 48)));
        __m128i half = _mm_add_epi16(_mm256_castsi256_si128(packed), _mm256_extracti128_si256(packed, 1));
        __m128i distances = _mm_add_epi16(half, _mm_unpackhi_epi64(half, half));
        __m128i near = _mm_cmpeq_epi16(_mm_min_epu16(distances, limit), distances);
        if (__builtin_expect((_mm_movemask_epi8(near) & 0xff) != 0, 0)) {
            uint64_t four = (uint64_t)_mm_cvtsi128_si64(distances);
            for (int r = 0; r < 4; r++) {
                unsigned distance = (unsigned)((four >> (16 * r)) & 0xffff);
                if (distance <= radius)
                    keep(found, row + r, distance);
            }
        }
    }
    return whole;
}

__attribute__((target("avx2,popcnt"))) static Py_ssize_t scan_avx2(const uint8_t *codes, Py_ssize_t rows,
                                                                   Py_ssize_t chunks, const uint8_t *query,
                                                                   unsigned radius, Found *found) {
    if (chunks == 1)
        return scan_avx2_chunks(codes, rows, 1, query, radius, found);
    return scan_avx2_chunks(codes, rows, chunks, query, radius, found);
}
#endif

static PyObject *within_radius(PyObject *self, PyObject *args) {
    Py_buffer codes, query, rows_out, distances_out;
    Py_ssize_t rows;
    int radius;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*ny*iw*w*", &codes, &rows, &query, &radius, &rows_out, &distances_out))
        return NULL;
    PyObject *result = NULL;
    const Py_ssize_t code_bytes = query.len;
    if (code_bytes <= 0 || rows < 0 || rows > codes.len / code_bytes) { /* (a division: no product to overflow) */
        PyErr_SetString(PyExc_ValueError, "codes must hold `rows` codes as long as the query");
        goto done;
    }
    if (rows_out.len % 8 || distances_out.len % 4 || radius < 0) {
        PyErr_SetString(PyExc_ValueError, "found rows are int64, their distances int32; the radius is >= 0");
        goto done;
    }
    Found found = {(int64_t *)rows_out.buf, (int32_t *)distances_out.buf, 0, 0};
    found.room = rows_out.len / 8 < distances_out.len / 4 ? rows_out.len / 8 : distances_out.len / 4;
    Py_BEGIN_ALLOW_THREADS /* other web threads go on while this one scans */
    Py_ssize_t scalar_from = 0;
#ifdef HAVE_X86
    if (code_bytes % 32 == 0 && code_bytes / 32 <= AVX2_MAX_CHUNKS && __builtin_cpu_supports("avx2"))
        scalar_from = scan_avx2((const uint8_t *)codes.buf, rows, code_bytes / 32, (const uint8_t *)query.buf,
                                (unsigned)radius, &found);
#endif
    scan_scalar((const uint8_t *)codes.buf, scalar_from, rows, code_bytes, (const uint8_t *)query.buf,
                (unsigned)radius, &found);
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(found.count);
done:
    PyBuffer_Release(&codes);
    PyBuffer_Release(&query);
    PyBuffer_Release(&rows_out);
    PyBuffer_Release(&distances_out);
    return result;
}

static PyMethodDef methods[] = {
    {"within_radius", within_radius, METH_VARARGS,
     "within_radius(codes, rows, query, radius, found_rows, found_distances) -> count: the first `rows` codes "
     "(C-contiguous, len(query) bytes each) whose Hamming distance to `query` is at most `radius`, in row order: "
     "their row numbers into found_rows (int64) and distances into found_distances (int32), as far as both have "
     "room. Returns how many rows are within the radius, written or not."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_scan", "The coarse stage's Hamming range scan.", -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__scan(void) { return PyModule_Create(&module); }
