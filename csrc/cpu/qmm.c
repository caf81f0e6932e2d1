/* qmm: y = x @ W^T with W in 32-wide blocks (codes u, fp16 d and m: w = d*u + m), any M.
 * The float32 activations are quantized here, per row and 32-block, to int8 (d = amax/127,
 * round to nearest even) with each block's code sum, so the dot products run on integers:
 * AVX-512 VNNI (vpdpbusd: u8 weights x s8 activations) when the CPU has it (AMX's tdpbsud from
 * 16 or 32 rows where it has that too: the same bits), else AVX2 (vpmaddubsw + vpmaddwd, the same
 * integers), else portable C. The packed layout is kernel/ops/qblocks.py's (qmm_pack): tiles of
 * QMM_NR = 16 columns; per tile and 32-block one record of eight 64-byte vectors, vector j = k 4j..4j+3 of
 * all 16 columns (vpdpbusd's operand; 4-bit: vectors j and j + 4 share bytes, low and high
 * nibble), then 16 fp16 d and 16 fp16 m. A tile streams from memory as one sequential run. */
#include <math.h>
#include <omp.h>
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

#include "qmm_vnni.h"   /* the AVX-512 VNNI path */
#include "qmm_avx2.h"   /* the AVX2 path */
#include "qmm_amx.h"    /* the AMX path (16 rows and more) */

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

int kvos_qmm_has_amx(void)
{
#if HAVE_AMX_PATH
    return qmm_amx_available();
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

enum { PATH_AUTO = 0, PATH_PORTABLE = 1, PATH_VNNI = 2, PATH_AVX2 = 3, PATH_AMX = 4 };
/* auto takes the AMX path from these rows: at 16-28 rows the 4-bit tiles' unpacking (once a tile)
 * and the VNNI remainder cost more than the tiles save (docs/performance.md, section 21) */
#define AMX_MIN_ROWS(bits) ((bits) == 4 ? 32 : 16)

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

#if HAVE_AMX_PATH
static AMX_TARGET void qmm_amx_tile4(float *y, int64_t y_stride, const qrows *a, int64_t m, const uint8_t *tile,
                                     int cols, uint8_t *codes, int32_t *dots, float *scales)
{
    qmm_amx_tile(y, y_stride, a, m, tile, cols, codes, dots, scales, 4);
}

static AMX_TARGET void qmm_amx_tile8(float *y, int64_t y_stride, const qrows *a, int64_t m, const uint8_t *tile,
                                     int cols, uint8_t *codes, int32_t *dots, float *scales)
{
    qmm_amx_tile(y, y_stride, a, m, tile, cols, codes, dots, scales, 8);
}
#endif

int kvos_qmm(float *y, int64_t y_stride, const float *x, int64_t x_stride, int64_t m, int64_t k,
             const uint8_t *w, int64_t n, int bits, int path)
{
    const int64_t kb = k / BLOCK, ntiles = (n + QMM_NR - 1) / QMM_NR;
    const int64_t tile_bytes = kb * record_bytes(bits);
    const int amx = kvos_qmm_has_amx();      /* implies VNNI (the rows past the last 16 run there) */
    if (path == PATH_AUTO)
        path = amx && m >= AMX_MIN_ROWS(bits) ? PATH_AMX : kvos_qmm_has_vnni() ? PATH_VNNI
             : kvos_qmm_has_avx2() ? PATH_AVX2 : PATH_PORTABLE;
    else if (path == PATH_AMX && !amx)
        path = PATH_PORTABLE;
    quantize_fn quantize;
    tile_fn run_tile;
    qmm_path(path == PATH_AMX ? PATH_VNNI : path, bits, &quantize, &run_tile);
    const int nthreads = kvos_num_threads();
    /* the AMX path's buffers (64-byte aligned): the row groups' scales (m / 16 x kb x 128 bytes), then
     * each thread's own: a row group's dots (kb x 1 KB) and, for 4-bit tiles, the unpacked codes
     * (kb x 512 bytes) */
    const int64_t groups = path == PATH_AMX ? m / 16 : 0;
    const int64_t unpacked = path == PATH_AMX ? kb * (1024 + (bits == 4 ? 512 : 0)) : 0;
    /* one allocation, 64-byte aligned (a tile row of 32 codes then never straddles two cache lines):
     * the codes (a multiple of 32 bytes a row) first, then d, d * sum and sum, then the AMX buffers */
    const size_t rows_bytes = (size_t)(m * kb) * (BLOCK + 2 * sizeof(float) + sizeof(int32_t));
    char *scratch = malloc(64 + rows_bytes + (size_t)(unpacked ? groups * kb * 128 + nthreads * unpacked + 64 : 0));
    if (!scratch)
        return KVOS_E_NOMEM;
    char *base = (char *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    float *amx_scales_base = (float *)(((uintptr_t)(base + rows_bytes) + 63) & ~(uintptr_t)63);
    uint8_t *unpack_base = (uint8_t *)(amx_scales_base + groups * kb * 32);
    float *floats = (float *)(base + m * kb * BLOCK);
    qrows a = {(int8_t *)base, floats, floats + m * kb, kb,
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
    #pragma omp parallel num_threads(nthreads) if (ntiles * tile_bytes * (m + 3) > (1 << 18))
    {
        if (split) {        /* the same m in every thread: all of them meet this loop, or none */
            #pragma omp for schedule(static)
            for (int64_t r = 0; r < m; r++)
                quantize(&a, r, x + r * x_stride);
        }
#if HAVE_AMX_PATH
        if (path == PATH_AMX) {     /* tile configuration, dots and unpacked codes are each thread's */
            #pragma omp for schedule(static)
            for (int64_t g = 0; g < groups; g++)
                amx_scales(amx_scales_base, &a, g);
            int32_t *dots = (int32_t *)(unpack_base + (int64_t)omp_get_thread_num() * unpacked);
            float *scales = amx_scales_base;
            uint8_t *codes = (uint8_t *)(dots + kb * 256);
            qmm_amx_begin();
            #pragma omp for schedule(static) nowait
            for (int64_t t = 0; t < ntiles; t++) {
                int cols = n - t * QMM_NR < QMM_NR ? (int)(n - t * QMM_NR) : QMM_NR;
                if (bits == 4)
                    qmm_amx_tile4(y + t * QMM_NR, y_stride, &a, m, w + t * tile_bytes, cols, codes, dots, scales);
                else
                    qmm_amx_tile8(y + t * QMM_NR, y_stride, &a, m, w + t * tile_bytes, cols, codes, dots, scales);
            }
            qmm_amx_end();
        } else
#endif
        {
            #pragma omp for schedule(static) nowait     /* the region's end is the one barrier after the tiles */
            for (int64_t t = 0; t < ntiles; t++) {
                int cols = n - t * QMM_NR < QMM_NR ? (int)(n - t * QMM_NR) : QMM_NR;
                run_tile(y + t * QMM_NR, y_stride, &a, m, w + t * tile_bytes, cols);
            }
        }
    }
    free(scratch);
    return KVOS_OK;
}
