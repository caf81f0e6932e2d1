/* qmm: y = x @ W^T with W in 32-wide blocks (codes u, fp16 d and m: w = d*u + m), any M.
 * The float32 activations are quantized here, per row and 32-block, to int8 (d = amax/127,
 * round to nearest even) with each block's code sum, so the dot products run on integers:
 * AVX-512 VNNI (vpdpbusd: u8 weights x s8 activations) when the CPU has it, else AVX2
 * (vpmaddubsw + vpmaddwd, the same integers), else portable C. The packed layout is kernel/ops/qblocks.py's (qmm_pack): tiles of QMM_NR = 16
 * columns; per tile and 32-block one record of eight 64-byte vectors, vector j = k 4j..4j+3 of
 * all 16 columns (vpdpbusd's operand; 4-bit: vectors j and j + 4 share bytes, low and high
 * nibble), then 16 fp16 d and 16 fp16 m. A tile streams from memory as one sequential run. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "kvos_cpu.h"

#define QMM_NR 16         /* columns per weight tile: one vector of int32 / float lanes */
#define QMM_MR 8          /* activation rows per register tile of the VNNI path (12 measured slower at M = 512) */
#define BLOCK 32
#define QUANTIZE_SPLIT_ROWS 16   /* rows from which the threads share the activations' quantization */

static inline int64_t code_bytes(int bits) { return bits == 4 ? 256 : 512; }
static inline int64_t record_bytes(int bits) { return code_bytes(bits) + 64; }

/* Quantized activations: q (m, kb * 32) int8, dx (m, kb) the blocks' d, xs (m, kb) d * sum(q). */
typedef struct {
    int8_t *q;
    float *dx, *xs;
    int64_t kb;
    int32_t *qsum;      /* sum(q) per row and block (the AVX2 path's code offset), NULL when unused */
} qrows;

static void quantize_row(const qrows *a, int64_t r, const float *x)
{
    for (int64_t b = 0; b < a->kb; b++) {
        const float *xb = x + b * BLOCK;
        float amax = 0.0f;
        for (int i = 0; i < BLOCK; i++)
            amax = fmaxf(amax, fabsf(xb[i]));
        float d = amax / 127.0f;
        int8_t *q = a->q + (r * a->kb + b) * BLOCK;
        int32_t sum = 0;
        for (int i = 0; i < BLOCK; i++) {
            /* x / d, not x * (1/d): the torch twin divides too, so both round the same way */
            float v = d > 0.0f ? nearbyintf(xb[i] / d) : 0.0f;
            v = fminf(fmaxf(v, -127.0f), 127.0f);
            q[i] = (int8_t)v;
            sum += (int32_t)v;
        }
        a->dx[r * a->kb + b] = d;
        a->xs[r * a->kb + b] = d * (float)sum;
        if (a->qsum)
            a->qsum[r * a->kb + b] = sum;
    }
}

static inline float half_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 31, man = h & 1023, bits;
    if (exp == 31)
        bits = sign | 0x7f800000u | (man << 13);
    else if (exp)
        bits = sign | ((exp + 112) << 23) | (man << 13);
    else if (!man)
        bits = sign;
    else {      /* subnormal: value man * 2^-24, exact in float */
        float f = (float)man * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Code of column c, element e (0..31) of a record. */
static inline int record_code(const uint8_t *rec, int bits, int c, int e)
{
    int j = e >> 2, i = e & 3;
    if (bits == 8)
        return rec[j * 64 + 4 * c + i];
    uint8_t byte = rec[(j & 3) * 64 + 4 * c + i];
    return j < 4 ? byte & 15 : byte >> 4;
}

/* The portable path: one output at a time, integer dots per block, the VNNI path's float
 * operations in the same order. */
static void qmm_portable_tile(float *y, int64_t y_stride, const qrows *a, int64_t m, const uint8_t *tile,
                              int bits, int cols)
{
    const int64_t rb = record_bytes(bits), cb = code_bytes(bits);
    for (int64_t r = 0; r < m; r++)
        for (int c = 0; c < cols; c++) {
            float acc = 0.0f;
            for (int64_t b = 0; b < a->kb; b++) {
                const uint8_t *rec = tile + b * rb;
                const uint16_t *s = (const uint16_t *)(rec + cb);
                const int8_t *q = a->q + (r * a->kb + b) * BLOCK;
                int32_t dot = 0;
                for (int e = 0; e < BLOCK; e++)
                    dot += record_code(rec, bits, c, e) * q[e];
                float f = (float)dot * a->dx[r * a->kb + b];
                acc = fmaf(f, half_to_float(s[c]), acc);
                acc = fmaf(half_to_float(s[QMM_NR + c]), a->xs[r * a->kb + b], acc);
            }
            y[r * y_stride + c] = acc;
        }
}

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

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
/* AVX2 (no VNNI): vpmaddubsw multiplies u8 codes by s8 activations and adds pairs into int16, vpmaddwd
 * with ones adds those pairs into int32: one column's 4-k dot per lane, as vpdpbusd gives. A 16-column
 * tile is two halves of 8 columns (the low and high 32 bytes of each 64-byte record vector), run
 * together so that one broadcast of 4 activation bytes feeds both.
 * 4-bit products are at most 15 x 127 x 2 = 3,810 a pair, so a block's eight pair sums add in int16
 * (30,480) before one vpmaddwd. 8-bit codes would overflow int16 (255 x 127 x 2): they are recentred,
 * s = u - 128 (|s| <= 128, 32,512 a pair), multiplied as |s| x sign(q, s), and u.q = s.q + 128 sum(q)
 * restores the exact integer dot. The float operations then follow the VNNI path's order on the same
 * integers, so every path gives the portable path's outputs. */
#define QMM_AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
#define QMM_AVX2_MR 4     /* rows per register tile, both kernels (5 or 6 measured no faster) */
#define HAVE_AVX2_PATH 1

static inline __attribute__((always_inline)) QMM_AVX2_TARGET __m256i bcast4_256(const int8_t *p)
{
    return _mm256_set1_epi32(*(const alias_i32 *)p);
}

/* Stores R rows of (up to) 16 columns held as two 8-lane halves. */
static inline __attribute__((always_inline)) QMM_AVX2_TARGET void
store_rows16(float *y, int64_t y_stride, int64_t r0, const __m256 *acc0, const __m256 *acc1, int cols, const int R)
{
    for (int r = 0; r < R; r++) {
        float *yr = y + (r0 + r) * y_stride;
        if (cols == QMM_NR) {
            _mm256_storeu_ps(yr, acc0[r]);
            _mm256_storeu_ps(yr + 8, acc1[r]);
        } else {
            float tmp[QMM_NR];
            _mm256_storeu_ps(tmp, acc0[r]);
            _mm256_storeu_ps(tmp + 8, acc1[r]);
            for (int c = 0; c < cols; c++)
                yr[c] = tmp[c];
        }
    }
}

/* One block's integer dots (int32, both halves) into R rows' float accumulators, in the VNNI path's
 * order: acc += (dot * dx) * d_w, then acc += m_w * (dx * sum q). scales: the record's 16 fp16 d, 16 m. */
static inline __attribute__((always_inline)) QMM_AVX2_TARGET void
add_block(__m256 *acc0, __m256 *acc1, const __m256i *dot0, const __m256i *dot1, const uint8_t *scales,
          const qrows *a, int64_t r0, int64_t b, const int R)
{
    const __m256 dw0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)scales));
    const __m256 dw1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scales + 16)));
    const __m256 mw0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scales + 32)));
    const __m256 mw1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scales + 48)));
    for (int r = 0; r < R; r++) {
        const int64_t at = (r0 + r) * a->kb + b;
        const __m256 dx = _mm256_set1_ps(a->dx[at]), xs = _mm256_set1_ps(a->xs[at]);
        acc0[r] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(dot0[r]), dx), dw0, acc0[r]);
        acc1[r] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(dot1[r]), dx), dw1, acc1[r]);
        acc0[r] = _mm256_fmadd_ps(mw0, xs, acc0[r]);
        acc1[r] = _mm256_fmadd_ps(mw1, xs, acc1[r]);
    }
}

/* R rows (1..4) x a whole 4-bit tile, both halves at once (M >= 2; one row: qmm_avx2_row1_4bit):
 * each activation broadcast feeds both halves' vpmaddubsw and each loaded record vector all R rows.
 * The half-at-a-time loop this replaced broadcast every activation twice; with the v loop kept rolled
 * (unrolled, gcc hoisted every broadcast and spilled the sums) it runs 1.3-1.4x faster at M >= 2. */
static inline __attribute__((always_inline)) QMM_AVX2_TARGET void
qmm_avx2_rows_4bit(float *y, int64_t y_stride, const qrows *a, int64_t r0, const uint8_t *tile, int cols,
                   const int R)
{
    const int64_t rb = record_bytes(4), cb = code_bytes(4), kb = a->kb;
    const int64_t row = kb * BLOCK;        /* from one row's codes to the next row's */
    __m256 acc0[QMM_AVX2_MR], acc1[QMM_AVX2_MR];
    for (int r = 0; r < R; r++)
        acc0[r] = acc1[r] = _mm256_setzero_ps();
    const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    for (int64_t b = 0; b < kb; b++) {
        const uint8_t *rec = tile + b * rb;
        if (r0 == 0)
            prefetch_ahead(tile, b, rb);
        const int8_t *q = a->q + (r0 * kb + b) * BLOCK;
        __m256i dot0[QMM_AVX2_MR], dot1[QMM_AVX2_MR];
        for (int r = 0; r < R; r++)
            dot0[r] = dot1[r] = _mm256_setzero_si256();
#pragma GCC unroll 1
        for (int v = 0; v < 4; v++) {      /* record vector v: k 4v..4v+3 (low nibbles), 4v+16.. (high) */
            const __m256i p0 = _mm256_loadu_si256((const __m256i *)(rec + 64 * v));
            const __m256i p1 = _mm256_loadu_si256((const __m256i *)(rec + 64 * v + 32));
            const __m256i lo0 = _mm256_and_si256(p0, low), lo1 = _mm256_and_si256(p1, low);
            for (int r = 0; r < R; r++) {  /* int16 sums: 8 products of <= 3,810 cannot overflow */
                const __m256i x = bcast4_256(q + r * row + 4 * v);
                dot0[r] = _mm256_add_epi16(dot0[r], _mm256_maddubs_epi16(lo0, x));
                dot1[r] = _mm256_add_epi16(dot1[r], _mm256_maddubs_epi16(lo1, x));
            }
            const __m256i hi0 = _mm256_and_si256(_mm256_srli_epi16(p0, 4), low);
            const __m256i hi1 = _mm256_and_si256(_mm256_srli_epi16(p1, 4), low);
            for (int r = 0; r < R; r++) {
                const __m256i x = bcast4_256(q + r * row + 4 * v + 16);
                dot0[r] = _mm256_add_epi16(dot0[r], _mm256_maddubs_epi16(hi0, x));
                dot1[r] = _mm256_add_epi16(dot1[r], _mm256_maddubs_epi16(hi1, x));
            }
        }
        for (int r = 0; r < R; r++) {      /* int16 pair sums -> int32 */
            dot0[r] = _mm256_madd_epi16(dot0[r], ones);
            dot1[r] = _mm256_madd_epi16(dot1[r], ones);
        }
        add_block(acc0, acc1, dot0, dot1, rec + cb, a, r0, b, R);
    }
    store_rows16(y, y_stride, r0, acc0, acc1, cols, R);
}

/* One row (decode) against a 4-bit tile: qmm_avx2_rows_4bit's sums and float operations with the v
 * loop unrolled. At one row the weights stream from memory and the unrolled loop is ~4% faster
 * (bench_qmm --split, SmolLM2's 4-bit projections from memory: 26.3-27.7 against 25.0-26.8 G MAC/s);
 * from 2 rows up the tile is reused from L1 and the rolled loop wins by 1.3-1.4x. */
static inline __attribute__((always_inline)) QMM_AVX2_TARGET void
qmm_avx2_row1_4bit(float *y, const qrows *a, const uint8_t *tile, int cols)
{
    const int64_t rb = record_bytes(4), cb = code_bytes(4), kb = a->kb;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    for (int64_t b = 0; b < kb; b++) {
        const uint8_t *rec = tile + b * rb;
        prefetch_ahead(tile, b, rb);
        const int8_t *q = a->q + b * BLOCK;
        __m256i dot0 = _mm256_setzero_si256(), dot1 = _mm256_setzero_si256();
        for (int v = 0; v < 4; v++) {
            const __m256i qlo = bcast4_256(q + 4 * v), qhi = bcast4_256(q + 4 * v + 16);
            const __m256i p0 = _mm256_loadu_si256((const __m256i *)(rec + 64 * v));
            const __m256i p1 = _mm256_loadu_si256((const __m256i *)(rec + 64 * v + 32));
            dot0 = _mm256_add_epi16(dot0, _mm256_maddubs_epi16(_mm256_and_si256(p0, low), qlo));
            dot1 = _mm256_add_epi16(dot1, _mm256_maddubs_epi16(_mm256_and_si256(p1, low), qlo));
            dot0 = _mm256_add_epi16(dot0, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(p0, 4), low), qhi));
            dot1 = _mm256_add_epi16(dot1, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(p1, 4), low), qhi));
        }
        dot0 = _mm256_madd_epi16(dot0, ones);
        dot1 = _mm256_madd_epi16(dot1, ones);
        add_block(&acc0, &acc1, &dot0, &dot1, rec + cb, a, 0, b, 1);
    }
    store_rows16(y, 0, 0, &acc0, &acc1, cols, 1);
}

/* R rows (1..4) x a whole 8-bit tile, both halves at once: each activation broadcast serves both
 * halves (the sign trick stays per half: sign(q, s) takes the weights' signs), and the j loop stays
 * rolled, as in the 4-bit kernel (unrolled, gcc spilled the accumulators). Against the half-at-a-time
 * loop it replaced: 1.8x at one row (the head streams from memory once, not once a half) and 1.15-1.2x
 * at 8-64 rows, the same outputs. */
static inline __attribute__((always_inline)) QMM_AVX2_TARGET void
qmm_avx2_rows_8bit(float *y, int64_t y_stride, const qrows *a, int64_t r0, const uint8_t *tile, int cols,
                   const int R)
{
    const int64_t rb = record_bytes(8), cb = code_bytes(8), kb = a->kb;
    const int64_t row = kb * BLOCK;
    __m256 acc0[QMM_AVX2_MR], acc1[QMM_AVX2_MR];
    for (int r = 0; r < R; r++)
        acc0[r] = acc1[r] = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8((char)0x80);
    for (int64_t b = 0; b < kb; b++) {
        const uint8_t *rec = tile + b * rb;
        if (r0 == 0)
            prefetch_ahead(tile, b, rb);
        const int8_t *q = a->q + (r0 * kb + b) * BLOCK;
        __m256i dot0[QMM_AVX2_MR], dot1[QMM_AVX2_MR];
        for (int r = 0; r < R; r++)
            dot0[r] = dot1[r] = _mm256_setzero_si256();
#pragma GCC unroll 1
        for (int j = 0; j < 8; j++) {      /* record vector j: k 4j..4j+3 of 16 columns, s = u - 128 */
            const __m256i s0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(rec + 64 * j)), flip);
            const __m256i s1 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(rec + 64 * j + 32)), flip);
            const __m256i abs0 = _mm256_abs_epi8(s0), abs1 = _mm256_abs_epi8(s1);
            for (int r = 0; r < R; r++) {
                const __m256i x = bcast4_256(q + r * row + 4 * j);
                dot0[r] = _mm256_add_epi32(dot0[r], _mm256_madd_epi16(_mm256_maddubs_epi16(abs0, _mm256_sign_epi8(x, s0)), ones));
                dot1[r] = _mm256_add_epi32(dot1[r], _mm256_madd_epi16(_mm256_maddubs_epi16(abs1, _mm256_sign_epi8(x, s1)), ones));
            }
        }
        for (int r = 0; r < R; r++) {      /* u.q = s.q + 128 sum(q) */
            const __m256i off = _mm256_set1_epi32(128 * a->qsum[(r0 + r) * kb + b]);
            dot0[r] = _mm256_add_epi32(dot0[r], off);
            dot1[r] = _mm256_add_epi32(dot1[r], off);
        }
        add_block(acc0, acc1, dot0, dot1, rec + cb, a, r0, b, R);
    }
    store_rows16(y, y_stride, r0, acc0, acc1, cols, R);
}

/* All m rows in as few register tiles as QMM_AVX2_MR allows, of near-equal size (6 rows run as 3 + 3,
 * not 4 + 2: a small tile pays the weights' unpacking for few rows). */
#define AVX2_ROW_TILES(CALL)                                                                   \
    const int64_t nblocks = (m + QMM_AVX2_MR - 1) / QMM_AVX2_MR;                               \
    for (int64_t i = 0, r0 = 0, rows; i < nblocks; i++, r0 += rows) {                         \
        rows = (m - r0 + (nblocks - i) - 1) / (nblocks - i);                                   \
        switch ((int)rows) {                                                                   \
        case 1: CALL(1); break;                                                                \
        case 2: CALL(2); break;                                                                \
        case 3: CALL(3); break;                                                                \
        default: CALL(4); break;                                                               \
        }                                                                                      \
    }

static QMM_AVX2_TARGET void qmm_avx2_tile4(float *y, int64_t y_stride, const qrows *a, int64_t m,
                                           const uint8_t *tile, int cols)
{
    if (m == 1) {
        qmm_avx2_row1_4bit(y, a, tile, cols);
        return;
    }
#define ROWS_4BIT(R) qmm_avx2_rows_4bit(y, y_stride, a, r0, tile, cols, R)
    AVX2_ROW_TILES(ROWS_4BIT)
#undef ROWS_4BIT
}

static QMM_AVX2_TARGET void qmm_avx2_tile8(float *y, int64_t y_stride, const qrows *a, int64_t m,
                                           const uint8_t *tile, int cols)
{
#define ROWS_8BIT(R) qmm_avx2_rows_8bit(y, y_stride, a, r0, tile, cols, R)
    AVX2_ROW_TILES(ROWS_8BIT)
#undef ROWS_8BIT
}

/* quantize_row's arithmetic 8 lanes at a time (the same IEEE division and rounding: the same codes). */
static QMM_AVX2_TARGET void quantize_row_avx2(const qrows *a, int64_t r, const float *x)
{
    const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < a->kb; b++) {
        const float *xb = x + b * BLOCK;
        __m256 xv[4], m = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            xv[i] = _mm256_loadu_ps(xb + 8 * i);
            m = _mm256_max_ps(_mm256_andnot_ps(sign, xv[i]), m);   /* a NaN x is skipped, as fmaxf does */
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
        const float d = _mm_cvtss_f32(m4) / 127.0f;
        __m256i iv[4], sum = _mm256_setzero_si256();
        for (int i = 0; i < 4; i++) {
            __m256 v = _mm256_setzero_ps();
            if (d > 0.0f)
                v = _mm256_round_ps(_mm256_div_ps(xv[i], _mm256_set1_ps(d)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);            /* a NaN quotient clamps to -127, as in C */
            iv[i] = _mm256_cvtps_epi32(v);
            sum = _mm256_add_epi32(sum, iv[i]);
        }
        /* int32 -> int8 in order: the packs interleave 128-bit lanes, the permute undoes it */
        const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(iv[0], iv[1]), _mm256_packs_epi32(iv[2], iv[3]));
        _mm256_storeu_si256((__m256i *)(a->q + (r * a->kb + b) * BLOCK),
                            _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
        const int32_t total = _mm_cvtsi128_si32(s4);
        a->dx[r * a->kb + b] = d;
        a->xs[r * a->kb + b] = d * (float)total;
        if (a->qsum)
            a->qsum[r * a->kb + b] = total;
    }
}
#else
#define HAVE_AVX2_PATH 0
#endif

int kvos_qmm_has_vnni(void)
{
#if HAVE_VNNI_PATH
    __builtin_cpu_init();
    return kvos_cpu_avx512() && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni")
        && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

int64_t kvos_qmm_record_bytes(int bits) { return record_bytes(bits); }

/* A row's 32-element blocks: each in one record of its tile, the column's codes 4 bytes a vector. The
 * product and the sum are rounded apart (fp-contract off here: no FMA), as the twin (reference.qmm_rows)
 * computes them. */
__attribute__((optimize("fp-contract=off")))
void kvos_qmm_rows(float *out, const uint8_t *w, int64_t n, int64_t k, int bits, const int64_t *ids, int64_t nids)
{
    (void)n;
    const int64_t kb = k / BLOCK, rb = record_bytes(bits), cb = code_bytes(bits);
    for (int64_t i = 0; i < nids; i++) {
        const int64_t tile = ids[i] / QMM_NR;
        const int c = (int)(ids[i] % QMM_NR);
        for (int64_t b = 0; b < kb; b++) {
            const uint8_t *rec = w + (tile * kb + b) * rb;
            const uint16_t *s = (const uint16_t *)(rec + cb);
            const float d = half_to_float(s[c]), m = half_to_float(s[QMM_NR + c]);
            float *o = out + i * k + b * BLOCK;
            for (int e = 0; e < BLOCK; e++)
                o[e] = (float)record_code(rec, bits, c, e) * d + m;
        }
    }
}

int kvos_qmm_has_avx2(void)
{
#if HAVE_AVX2_PATH
    return kvos_cpu_avx2();
#else
    return 0;
#endif
}

enum { PATH_AUTO = 0, PATH_PORTABLE = 1, PATH_VNNI = 2, PATH_AVX2 = 3 };

/* What a path runs: its row quantizer and its tile kernel for 4- and 8-bit codes. */
typedef void (*quantize_fn)(const qrows *a, int64_t r, const float *x);
typedef void (*tile_fn)(float *y, int64_t y_stride, const qrows *a, int64_t m, const uint8_t *tile, int cols);

static void qmm_portable_tile4(float *y, int64_t y_stride, const qrows *a, int64_t m, const uint8_t *tile, int cols)
{
    qmm_portable_tile(y, y_stride, a, m, tile, 4, cols);
}

static void qmm_portable_tile8(float *y, int64_t y_stride, const qrows *a, int64_t m, const uint8_t *tile, int cols)
{
    qmm_portable_tile(y, y_stride, a, m, tile, 8, cols);
}

/* The path's functions, once a call (a path this build lacks falls to the portable one; the
 * callers check kvos_qmm_has_vnni / _avx2 before naming one). */
static void qmm_path(int path, int bits, quantize_fn *quantize, tile_fn *tile)
{
    *quantize = quantize_row;
    *tile = bits == 4 ? qmm_portable_tile4 : qmm_portable_tile8;
#if HAVE_VNNI_PATH
    if (path == PATH_VNNI) {
        *quantize = quantize_row_avx512;
        *tile = bits == 4 ? qmm_vnni_tile4 : qmm_vnni_tile8;
    }
#endif
#if HAVE_AVX2_PATH
    if (path == PATH_AVX2) {
        *quantize = quantize_row_avx2;
        *tile = bits == 4 ? qmm_avx2_tile4 : qmm_avx2_tile8;
    }
#endif
}

int kvos_qmm(float *y, int64_t y_stride, const float *x, int64_t x_stride, int64_t m, int64_t k,
             const uint8_t *w, int64_t n, int bits, int path)
{
    const int64_t kb = k / BLOCK, ntiles = (n + QMM_NR - 1) / QMM_NR;
    const int64_t tile_bytes = kb * record_bytes(bits);
    if (path == PATH_AUTO)
        path = kvos_qmm_has_vnni() ? PATH_VNNI : kvos_qmm_has_avx2() ? PATH_AVX2 : PATH_PORTABLE;
    quantize_fn quantize;
    tile_fn run_tile;
    qmm_path(path, bits, &quantize, &run_tile);
    /* one allocation: the codes (a multiple of 32 bytes a row) first, then d, d * sum and sum */
    char *scratch = malloc((size_t)(m * kb) * (BLOCK + 2 * sizeof(float) + sizeof(int32_t)) + 1);
    if (!scratch)
        return KVOS_E_NOMEM;
    float *floats = (float *)(scratch + m * kb * BLOCK);
    qrows a = {(int8_t *)scratch, floats, floats + m * kb, kb,
               path == PATH_AVX2 ? (int32_t *)(floats + 2 * m * kb) : NULL};
    /* From QUANTIZE_SPLIT_ROWS rows the rows are quantized inside the parallel region, split among
     * the threads (the loop's barrier: every row before any tile): 2-3% of a 64- or 512-row call on 2
     * threads. Below it the barrier costs more than the split saves (5% of a one-row call). */
    const int split = m >= QUANTIZE_SPLIT_ROWS;
    if (!split)
        for (int64_t r = 0; r < m; r++)
            quantize(&a, r, x + r * x_stride);
    /* One tile of 16 columns is the unit of work: at M = 1 a tile of K = 576 is ~5.6 KB,
     * so threads pay off only past a few dozen tiles' worth of bytes. */
    #pragma omp parallel num_threads(kvos_num_threads()) if (ntiles * tile_bytes * (m + 3) > (1 << 18))
    {
        if (split) {        /* the same m in every thread: all of them meet this loop, or none */
            #pragma omp for schedule(static)
            for (int64_t r = 0; r < m; r++)
                quantize(&a, r, x + r * x_stride);
        }
        #pragma omp for schedule(static) nowait     /* the region's end is the one barrier after the tiles */
        for (int64_t t = 0; t < ntiles; t++) {
            int cols = n - t * QMM_NR < QMM_NR ? (int)(n - t * QMM_NR) : QMM_NR;
            run_tile(y + t * QMM_NR, y_stride, &a, m, w + t * tile_bytes, cols);
        }
    }
    free(scratch);
    return KVOS_OK;
}
