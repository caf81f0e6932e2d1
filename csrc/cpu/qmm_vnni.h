/* qmm's AVX-512 VNNI path (vpdpbusd: u8 weight codes x s8 activations), 4 and 8 bits: register
 * tiles of up to QMM_MR rows x one 16-column weight tile, and the activations' quantization in
 * 16-lane vectors. One translation unit with qmm.c: included once by it, after the layout, qrows and
 * the portable tile, which it uses. Also defines what the AVX2 path shares (alias_i32,
 * prefetch_ahead). HAVE_VNNI_PATH says whether it was compiled. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define QMM_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c")))
#define HAVE_VNNI_PATH 1

/* 4 activation bytes broadcast to 16 lanes, read through a may_alias type so the compiler folds
 * it into vpdpbusd's memory operand ({1to16}) instead of issuing a separate broadcast. */
typedef int32_t __attribute__((may_alias, aligned(1))) alias_i32;

#define QMM_AHEAD 8       /* records prefetched ahead (past a tile's end: the next tile's, contiguous) */

/* The first pass over a tile streams it from memory: ask for the records QMM_AHEAD ahead. Both
 * vector paths (a plain SSE prefetch: any x86-64). */
static inline __attribute__((always_inline)) void prefetch_ahead(const uint8_t *tile, int64_t b, int64_t rb)
{
    for (int64_t l = 0; l < rb; l += 64)
        _mm_prefetch((const char *)(tile + (b + QMM_AHEAD) * rb + l), _MM_HINT_T0);
}

static inline __attribute__((always_inline)) QMM_TARGET __m512i bcast4(const int8_t *p)
{
    return _mm512_set1_epi32(*(const alias_i32 *)p);
}

/* R rows x one tile's 16 columns over all blocks (R and BITS constants in each instantiation):
 * each block's weight vectors are unpacked once into registers and used by all R rows. */
static inline __attribute__((always_inline)) QMM_TARGET void
qmm_vnni_rows(float *y, int64_t y_stride, const qrows *a, int64_t r0, const uint8_t *tile, int cols,
              const int R, const int BITS)
{
    const int64_t rb = record_bytes(BITS), cb = code_bytes(BITS), kb = a->kb;
    __m512 acc[QMM_MR];
    for (int r = 0; r < R; r++)
        acc[r] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi8(15);
    for (int64_t b = 0; b < kb; b++) {
        const uint8_t *rec = tile + b * rb;
        /* the first row block streams the tile; fewer rows than these measured faster without
         * (the hardware prefetcher alone; an 8-bit record is 9 prefetches) */
        if (R >= (BITS == 4 ? 4 : 6) && r0 == 0)
            prefetch_ahead(tile, b, rb);
        __m512i w[8];
        if (BITS == 4) {
            for (int v = 0; v < 4; v++) {
                __m512i p = _mm512_loadu_si512((const void *)(rec + 64 * v));
                w[v] = _mm512_and_si512(p, low);
                w[v + 4] = _mm512_and_si512(_mm512_srli_epi16(p, 4), low);
            }
        } else {
            for (int j = 0; j < 8; j++)
                w[j] = _mm512_loadu_si512((const void *)(rec + 64 * j));
        }
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(rec + cb)));
        const __m512 mw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(rec + cb + 32)));
        for (int r = 0; r < R; r++) {
            const int8_t *q = a->q + ((r0 + r) * kb + b) * BLOCK;
            /* two chains of 4 dots, not one of 8: half the latency before the conversion */
            __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], bcast4(q));
            __m512i t = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[1], bcast4(q + 4));
            for (int j = 2; j < 8; j += 2) {
                s = _mm512_dpbusd_epi32(s, w[j], bcast4(q + 4 * j));
                t = _mm512_dpbusd_epi32(t, w[j + 1], bcast4(q + 4 * j + 4));
            }
            s = _mm512_add_epi32(s, t);
            const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(a->dx[(r0 + r) * kb + b]));
            acc[r] = _mm512_fmadd_ps(f, dw, acc[r]);
            acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(a->xs[(r0 + r) * kb + b]), acc[r]);
        }
    }
    const __mmask16 keep = (__mmask16)((1u << cols) - 1);
    for (int r = 0; r < R; r++)
        _mm512_mask_storeu_ps(y + (r0 + r) * y_stride, keep, acc[r]);
}

/* quantize_row's arithmetic 16 lanes at a time (IEEE division and round-to-nearest-even alike, so
 * the codes are the same bits): the scalar loop cost ~4 ns an element, a sixth of a 64-row step. */
static QMM_TARGET void quantize_row_avx512(const qrows *a, int64_t r, const float *x)
{
    const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
    for (int64_t b = 0; b < a->kb; b++) {
        const float *xb = x + b * BLOCK;
        __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
        /* max_ps returns its second operand when either is NaN: a NaN x is skipped, as fmaxf does */
        __m512 m = _mm512_max_ps(_mm512_abs_ps(x0), _mm512_setzero_ps());
        m = _mm512_max_ps(_mm512_abs_ps(x1), m);
        const float d = _mm512_reduce_max_ps(m) / 127.0f;
        int8_t *q = a->q + (r * a->kb + b) * BLOCK;
        __m512i sum = _mm512_setzero_si512();
        for (int h = 0; h < 2; h++) {
            __m512 v = _mm512_setzero_ps();
            if (d > 0.0f)
                v = _mm512_roundscale_ps(_mm512_div_ps(h ? x1 : x0, _mm512_set1_ps(d)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);     /* a NaN quotient clamps to -127, as in C */
            __m512i iv = _mm512_cvtps_epi32(v);
            sum = _mm512_add_epi32(sum, iv);
            _mm_storeu_si128((__m128i *)(q + 16 * h), _mm512_cvtepi32_epi8(iv));
        }
        a->dx[r * a->kb + b] = d;
        a->xs[r * a->kb + b] = d * (float)_mm512_reduce_add_epi32(sum);
    }
}

#define ROWS_CASES(BITS)                                                              \
    const int64_t nblocks = (m + QMM_MR - 1) / QMM_MR;                                \
    for (int64_t i = 0, r0 = 0, rows; i < nblocks; i++, r0 += rows) {                \
        rows = (m - r0 + (nblocks - i) - 1) / (nblocks - i);                          \
        switch ((int)rows) {                                                          \
        case 1: qmm_vnni_rows(y, y_stride, a, r0, tile, cols, 1, BITS); break;        \
        case 2: qmm_vnni_rows(y, y_stride, a, r0, tile, cols, 2, BITS); break;        \
        case 3: qmm_vnni_rows(y, y_stride, a, r0, tile, cols, 3, BITS); break;        \
        case 4: qmm_vnni_rows(y, y_stride, a, r0, tile, cols, 4, BITS); break;        \
        case 5: qmm_vnni_rows(y, y_stride, a, r0, tile, cols, 5, BITS); break;        \
        case 6: qmm_vnni_rows(y, y_stride, a, r0, tile, cols, 6, BITS); break;        \
        case 7: qmm_vnni_rows(y, y_stride, a, r0, tile, cols, 7, BITS); break;        \
        default: qmm_vnni_rows(y, y_stride, a, r0, tile, cols, 8, BITS); break;       \
        }                                                                             \
    }

/* All m rows against one tile, in as few row blocks as QMM_MR allows, of near-equal size (12
 * rows run as 6 + 6, not 8 + 4: a small block pays the weights' unpacking for few rows). The
 * first block streams the tile from memory, the rest find it in L1/L2 (15 KB at K = 1536). */
static QMM_TARGET void qmm_vnni_tile4(float *y, int64_t y_stride, const qrows *a, int64_t m, const uint8_t *tile,
                                      int cols)
{
    ROWS_CASES(4)
}

static QMM_TARGET void qmm_vnni_tile8(float *y, int64_t y_stride, const qrows *a, int64_t m, const uint8_t *tile,
                                      int cols)
{
    ROWS_CASES(8)
}
#else
#define HAVE_VNNI_PATH 0
#endif
