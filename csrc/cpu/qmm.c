/* qmm: y = x @ W^T for small M with W in 32-wide blocks (codes u, fp16 d and m: w = d*u + m).
 * The float32 activations are quantized here, per row and 32-block, to int8 (d = amax/127,
 * round to nearest even) with each block's code sum, so the dot products run on integers:
 * AVX-512 VNNI (vpdpbusd: u8 weights x s8 activations) when the CPU has it, portable C
 * otherwise. The packed weight layout is kernel/ops/qblocks.py's (qmm_pack): tiles of QMM_NR
 * columns, each tile a run of 64-element pair records (codes of the 4 columns, then their
 * scales d0 d1 m0 m1 as fp16), so one tile streams from memory as one sequential run. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "kvos_cpu.h"

#define QMM_NR 4          /* columns per weight tile */
#define QMM_MR 4          /* activation rows per register tile of the VNNI path */
#define PAIR 64           /* elements per record: two 32-blocks */

/* Quantized activations, per row and pair: 64 int8 codes, 16 floats (lanes 0-7 the first
 * block's d, 8-15 the second's: multiplies a vpdpbusd result as is), then 4 floats
 * {0, 0, d0*sum0, d1*sum1} that meet a record's {d0, d1, m0, m1} for the offset term. */
typedef struct {
    int8_t q[PAIR];
    float dv[16];
    float xs[4];
} qpair;

static inline int64_t code_bytes(int bits) { return bits == 4 ? PAIR / 2 : PAIR; }
static inline int64_t record_bytes(int bits) { return QMM_NR * (code_bytes(bits) + 8); }

/* One row of k floats (k % 32 == 0) into npairs qpairs; a missing last block is all zeros. */
static void quantize_row(qpair *out, const float *x, int64_t k, int64_t npairs)
{
    memset(out, 0, (size_t)npairs * sizeof(qpair));
    for (int64_t b = 0; b < k / 32; b++) {
        const float *xb = x + b * 32;
        float amax = 0.0f;
        for (int i = 0; i < 32; i++)
            amax = fmaxf(amax, fabsf(xb[i]));
        float d = amax / 127.0f;
        qpair *p = out + b / 2;
        int8_t *q = p->q + (b & 1) * 32;
        int32_t sum = 0;
        for (int i = 0; i < 32; i++) {
            /* x / d, not x * (1/d): the torch twin divides too, so both round the same way */
            float v = d > 0.0f ? nearbyintf(xb[i] / d) : 0.0f;
            v = fminf(fmaxf(v, -127.0f), 127.0f);
            q[i] = (int8_t)v;
            sum += (int32_t)v;
        }
        for (int i = 0; i < 8; i++)
            p->dv[(b & 1) * 8 + i] = d;
        p->xs[2 + (b & 1)] = d * (float)sum;
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

/* The portable path: one output at a time, integer dots per block, in plain C. */
static void qmm_portable_tile(float *y, int64_t y_stride, const qpair *xq, int64_t m, int64_t npairs,
                              const uint8_t *tile, int bits, int64_t cols)
{
    const int64_t cb = code_bytes(bits), rb = record_bytes(bits);
    for (int64_t r = 0; r < m; r++)
        for (int64_t c = 0; c < cols; c++) {
            float acc = 0.0f;
            for (int64_t p = 0; p < npairs; p++) {
                const uint8_t *rec = tile + p * rb, *codes = rec + c * cb;
                const uint16_t *s = (const uint16_t *)(rec + QMM_NR * cb) + 4 * c;
                const qpair *xp = xq + r * npairs + p;
                for (int h = 0; h < 2; h++) {
                    int32_t dot = 0;
                    for (int i = 0; i < 32; i++) {
                        int j = h * 32 + i;
                        int u = bits == 4 ? (j < 32 ? codes[j] & 15 : codes[j - 32] >> 4) : codes[j];
                        dot += u * xp->q[j];
                    }
                    acc += (float)dot * half_to_float(s[h]) * xp->dv[h * 8] + half_to_float(s[2 + h]) * xp->xs[2 + h];
                }
            }
            y[r * y_stride + c] = acc;
        }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define QMM_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define HAVE_VNNI_PATH 1

/* MR rows x the tile's 4 columns over all pairs; the weight codes of a record are unpacked
 * once into registers and used by all MR rows (MR is a constant in each instantiation). */
static inline __attribute__((always_inline)) QMM_TARGET void
qmm_vnni_block(float *y, int64_t y_stride, const qpair *xq, int64_t npairs,
               const uint8_t *tile, int bits, int64_t cols, const int MR)
{
    const int64_t cb = code_bytes(bits), rb = record_bytes(bits);
    __m512 acc[QMM_MR][QMM_NR], off[QMM_MR];
    for (int r = 0; r < MR; r++) {
        off[r] = _mm512_setzero_ps();
        for (int c = 0; c < QMM_NR; c++)
            acc[r][c] = _mm512_setzero_ps();
    }
    const __m256i low = _mm256_set1_epi8(15);
    for (int64_t p = 0; p < npairs; p++) {
        const uint8_t *rec = tile + p * rb;
        _mm_prefetch((const char *)(rec + 8 * rb), _MM_HINT_T0);
        _mm_prefetch((const char *)(rec + 8 * rb + 64), _MM_HINT_T0);
        __m512 sf = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(rec + QMM_NR * cb)));
        __m512i w[QMM_NR];
        __m512 dw[QMM_NR];
        for (int c = 0; c < QMM_NR; c++) {
            if (bits == 4) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(rec + c * cb));
                __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                w[c] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
            } else {
                w[c] = _mm512_loadu_si512((const void *)(rec + c * cb));
            }
            const __m512i idx = _mm512_set_epi32(4 * c + 1, 4 * c + 1, 4 * c + 1, 4 * c + 1, 4 * c + 1, 4 * c + 1,
                                                 4 * c + 1, 4 * c + 1, 4 * c, 4 * c, 4 * c, 4 * c, 4 * c, 4 * c,
                                                 4 * c, 4 * c);
            dw[c] = _mm512_permutexvar_ps(idx, sf);
        }
        for (int r = 0; r < MR; r++) {
            const qpair *xp = xq + r * npairs + p;
            __m512i xv = _mm512_loadu_si512((const void *)xp->q);
            __m512 dx = _mm512_loadu_ps(xp->dv);
            off[r] = _mm512_fmadd_ps(sf, _mm512_broadcast_f32x4(_mm_loadu_ps(xp->xs)), off[r]);
            for (int c = 0; c < QMM_NR; c++) {
                __m512 dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w[c], xv));
                acc[r][c] = _mm512_fmadd_ps(_mm512_mul_ps(dot, dw[c]), dx, acc[r][c]);
            }
        }
    }
    for (int r = 0; r < MR; r++) {
        float o[16];
        _mm512_storeu_ps(o, off[r]);
        for (int c = 0; c < cols; c++)
            y[r * y_stride + c] = _mm512_reduce_add_ps(acc[r][c]) + o[4 * c + 2] + o[4 * c + 3];
    }
}

static QMM_TARGET void qmm_vnni_tile(float *y, int64_t y_stride, const qpair *xq, int64_t m, int64_t npairs,
                                     const uint8_t *tile, int bits, int64_t cols)
{
    int64_t r = 0;
    for (; r + QMM_MR <= m; r += QMM_MR)
        qmm_vnni_block(y + r * y_stride, y_stride, xq + r * npairs, npairs, tile, bits, cols, QMM_MR);
    switch (m - r) {
    case 3: qmm_vnni_block(y + r * y_stride, y_stride, xq + r * npairs, npairs, tile, bits, cols, 3); break;
    case 2: qmm_vnni_block(y + r * y_stride, y_stride, xq + r * npairs, npairs, tile, bits, cols, 2); break;
    case 1: qmm_vnni_block(y + r * y_stride, y_stride, xq + r * npairs, npairs, tile, bits, cols, 1); break;
    default: break;
    }
}
#else
#define HAVE_VNNI_PATH 0
#endif

int kvos_qmm_has_vnni(void)
{
#if HAVE_VNNI_PATH
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#else
    return 0;
#endif
}

int64_t kvos_qmm_record_bytes(int bits) { return record_bytes(bits); }

int kvos_qmm(float *y, int64_t y_stride, const float *x, int64_t x_stride, int64_t m, int64_t k,
             const uint8_t *w, int64_t n, int bits, int path)
{
    const int64_t npairs = (k + PAIR - 1) / PAIR, ntiles = (n + QMM_NR - 1) / QMM_NR;
    const int64_t tile_bytes = npairs * record_bytes(bits);
    qpair *xq = malloc((size_t)(m * npairs) * sizeof(qpair) + 1);
    if (!xq)
        return KVOS_E_NOMEM;
    for (int64_t r = 0; r < m; r++)
        quantize_row(xq + r * npairs, x + r * x_stride, k, npairs);
    int vnni = path == 2 || (path == 0 && kvos_qmm_has_vnni());
    /* One tile of 4 columns is the unit of work: at M = 1 a tile of K = 576 is ~1.5 KB,
     * so threads pay off only past a few hundred tiles' worth of bytes. */
    #pragma omp parallel for schedule(static) num_threads(kvos_num_threads()) if (ntiles * tile_bytes * (m + 3) > (1 << 18))
    for (int64_t t = 0; t < ntiles; t++) {
        int64_t cols = n - t * QMM_NR < QMM_NR ? n - t * QMM_NR : QMM_NR;
        const uint8_t *tile = w + t * tile_bytes;
#if HAVE_VNNI_PATH
        if (vnni) {
            qmm_vnni_tile(y + t * QMM_NR, y_stride, xq, m, npairs, tile, bits, cols);
            continue;
        }
#endif
        qmm_portable_tile(y + t * QMM_NR, y_stride, xq, m, npairs, tile, bits, cols);
    }
    (void)vnni;
    free(xq);
    return KVOS_OK;
}
