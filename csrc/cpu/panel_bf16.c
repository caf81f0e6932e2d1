/* panel_bf16: y = x @ W^T (+ bias, + y) for small M with W in bfloat16 column panels, x rounded to
 * bfloat16 (nearest even, as torch rounds), every sum in float32. W (n, k) is packed once at load
 * (kernel/ops/panel.py) as (panels, ceil(k / 2), 2 * PANEL) bf16: inside a panel, k-pair j holds
 * (W[c][2j], W[c][2j+1]) for its PANEL columns c, so one 64-byte vector is 16 columns x 2 k, the
 * operand of AVX512_BF16's vdpbf16ps (two products a lane, added to a float32 accumulator).
 * Unchecked: kernel/ops/panel.py checks shapes, strides and overlap before the call. */
#include <stdlib.h>
#include <omp.h>
#include "kvos_cpu.h"
#include "simd.h"
#include "bf16.h"

#define PANEL 64        /* columns per panel (panel_mm.c's width): 4 vectors of 16 */
#define ROWS 6          /* rows per tile: 6 x 4 accumulators + 4 weight vectors fit 32 registers */
#define PREFETCH 16     /* k-pairs (4 KB) ahead that the first tile of an unblocked panel prefetches */
#define KBLOCK 64       /* ROWS < m <= BLOCKED_ROWS: k-pairs a block (16 KB of a panel, in L1) that every row tile runs
                         * before the next block, whose stream the block's first tile prefetches */
#define BLOCKED_ROWS 12 /* k-blocks only up to two tiles: measured faster there, not past it (7c); the
                         * sums are parked between blocks in BLOCKED_ROWS x PANEL floats (3 KB) */

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* One output row of a tile: only the panel's real columns are written (never the padding). */
ALWAYS_INLINE void store_row(float *y, const float tmp[PANEL], int cols, const float *bias, int accumulate)
{
    for (int c = 0; c < cols; c++) {
        float s = bias ? tmp[c] + bias[c] : tmp[c];
        y[c] = accumulate ? y[c] + s : s;
    }
}

/* The plain-C tile (any CPU): each dword of the panel and of xs is a bf16 pair, widened exactly to
 * floats by shifts. Per output and k-pair the odd product is added first, then the even one, the
 * order vdpbf16ps documents; each product of two bf16 is exact in float32, so fused or not the sums
 * round the same way. xs holds R rows of kp pairs. */
ALWAYS_INLINE void tile_c(const int R, float *y, int64_t y_stride, const uint32_t *xs, int64_t kp,
                          const uint16_t *panel, int64_t j0, int64_t j1, int cols, const float *bias,
                          int accumulate, int64_t prefetch, float *park, int first, int last)
{
    vf acc[ROWS][4];
    const vi hi_mask = visplat((int32_t)0xffff0000u);
    for (int r = 0; r < R; r++)
        for (int v = 0; v < 4; v++)
            acc[r][v] = first ? vsplat(0.0f) : vload(park + r * PANEL + v * VW);
    for (int64_t j = j0; j < j1; j++) {
        const int32_t *w = (const int32_t *)(panel + j * 2 * PANEL);
        if (prefetch)
            for (int l = 0; l < 4; l++)
                __builtin_prefetch(w + prefetch * PANEL + l * VW);
        vf we[4], wo[4];
        for (int v = 0; v < 4; v++) {
            vi d = vload_i(w + v * VW);
            we[v] = (vf)(d << 16);
            wo[v] = (vf)(d & hi_mask);
        }
        for (int r = 0; r < R; r++) {
            uint32_t p = xs[r * kp + j];
            vf xe = vsplat(kvos_bf16_to_float((uint16_t)p)), xo = vsplat(kvos_bf16_to_float((uint16_t)(p >> 16)));
            for (int v = 0; v < 4; v++) {
                acc[r][v] += xo * wo[v];
                acc[r][v] += xe * we[v];
            }
        }
    }
    for (int r = 0; r < R; r++) {
        float tmp[PANEL], *dst = last ? tmp : park + r * PANEL;   /* parked exactly: the sums keep their order */
        for (int v = 0; v < 4; v++)
            vstore(dst + v * VW, acc[r][v]);
        if (last)
            store_row(y + r * y_stride, tmp, cols, bias, accumulate);
    }
}

/* R rows (1..ROWS, as a constant for each inlined copy) of x from row r0 over k-pairs [j0, j1). */
#define TILE_R(TILE, R, r0, j0, j1, pf, park, first, last)                                                  \
    switch (R) {                                                                                            \
    case 1: TILE(1, y + (r0) * y_stride, y_stride, xs + (r0) * kp, kp, panel, j0, j1, cols, bias, accumulate, pf, park, first, last); break; \
    case 2: TILE(2, y + (r0) * y_stride, y_stride, xs + (r0) * kp, kp, panel, j0, j1, cols, bias, accumulate, pf, park, first, last); break; \
    case 3: TILE(3, y + (r0) * y_stride, y_stride, xs + (r0) * kp, kp, panel, j0, j1, cols, bias, accumulate, pf, park, first, last); break; \
    case 4: TILE(4, y + (r0) * y_stride, y_stride, xs + (r0) * kp, kp, panel, j0, j1, cols, bias, accumulate, pf, park, first, last); break; \
    case 5: TILE(5, y + (r0) * y_stride, y_stride, xs + (r0) * kp, kp, panel, j0, j1, cols, bias, accumulate, pf, park, first, last); break; \
    default: TILE(6, y + (r0) * y_stride, y_stride, xs + (r0) * kp, kp, panel, j0, j1, cols, bias, accumulate, pf, park, first, last); break; \
    }

/* One panel against all m rows. Usually its row tiles one after another over all k (the first streams
 * the panel from memory, the rest find it in L2). For ROWS < m <= BLOCKED_ROWS every tile runs one
 * KBLOCK of k-pairs before any tile starts the next, the block in L1 and the next one prefetched by
 * the first tile (1.09x to 1.15x at m = 8; 0.8x to 0.9x at 32 and 64, so
 * not there: docs/performance.md 7c). TILE: tile_c or tile_dp. */
#define ONE_PANEL(TILE)                                                                                     \
    if (m <= ROWS || m > BLOCKED_ROWS) {                                                                    \
        for (int64_t r0 = 0; r0 < m; r0 += ROWS) {                                                          \
            int R = m - r0 < ROWS ? (int)(m - r0) : ROWS;                                                   \
            TILE_R(TILE, R, r0, 0, kp, r0 == 0 ? PREFETCH : 0, NULL, 1, 1)                                  \
        }                                                                                                   \
        return;                                                                                             \
    }                                                                                                       \
    float park[BLOCKED_ROWS * PANEL];                                                                       \
    for (int64_t j0 = 0; j0 < kp; j0 += KBLOCK) {                                                           \
        int64_t j1 = kp - j0 < KBLOCK ? kp : j0 + KBLOCK;                                                   \
        for (int64_t r0 = 0; r0 < m; r0 += ROWS) {                                                          \
            int R = m - r0 < ROWS ? (int)(m - r0) : ROWS;                                                   \
            TILE_R(TILE, R, r0, j0, j1, r0 == 0 ? KBLOCK : 0, park + r0 * PANEL, j0 == 0, j1 == kp)         \
        }                                                                                                   \
    }

typedef void panel_fn(float *, int64_t, const uint32_t *, const float *, int64_t, const uint16_t *, const float *,
                      int64_t, int, int);

static void panel_c(float *y, int64_t y_stride, const uint32_t *xs, const float *xf, int64_t kp,
                    const uint16_t *panel, const float *bias, int64_t m, int cols, int accumulate)
{
    (void)xf;
    ONE_PANEL(tile_c)
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_DP 1

/* The plain-C tile compiled for AVX-512 whatever the build's -march (for CPUs without bf16 dots). */
__attribute__((target("avx512f,fma"))) static void panel_c512(
    float *y, int64_t y_stride, const uint32_t *xs, const float *xf, int64_t kp, const uint16_t *panel,
    const float *bias, int64_t m, int cols, int accumulate)
{
    (void)xf;
    ONE_PANEL(tile_c)
}

/* AVX2 + FMA (16 registers of 8 floats): tile_c's 6 x 64 tile would spill. x's pairs come widened to
 * floats once per call (xf: row r's k-pair j at 2j, 2j + 1), so a row's two factors are two broadcasts
 * from memory. One row takes the whole panel (8 accumulators); up to SMALL_M rows do the same row after
 * row over blocks of KB_AVX2 k-pairs (rows_avx2: the first streams a block, the others find it in L1);
 * more rows go 6 at a time over quarters of the panel (12 accumulators), as panel_mm.c's AVX2 paths,
 * whose section 17 of docs/performance.md says why. The products and their order are tile_c's: the
 * same sums, bit for bit. */
#define KB_AVX2 64      /* k-pairs of a row block: 16 KB of panel */
#define SMALL_M 64      /* rows up to which the row blocks run (their partial sums: 16 KB of stack) */

ALWAYS_INLINE void tile8(const int R, const int C, float *y, int64_t y_stride, const float *xf, int64_t kp,
                         const uint16_t *panel, int c0, int cols, const float *bias, int accumulate)
{
    v8 acc[ROWS][8];
    const v8i hi_mask = {-65536, -65536, -65536, -65536, -65536, -65536, -65536, -65536};
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++)
            acc[r][c] = (v8){0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t j = 0; j < kp; j++) {
        const int32_t *w = (const int32_t *)(panel + j * 2 * PANEL) + c0;
        for (int c = 0; c < C; c++) {
            const v8i d = *(const v8i_u *)(w + 8 * c);
            const v8 we = (v8)(d << 16), wo = (v8)(d & hi_mask);
            for (int r = 0; r < R; r++) {
                const float e = xf[r * 2 * kp + 2 * j], o = xf[r * 2 * kp + 2 * j + 1];
                acc[r][c] += (v8){o, o, o, o, o, o, o, o} * wo;
                acc[r][c] += (v8){e, e, e, e, e, e, e, e} * we;
            }
        }
    }
    for (int r = 0; r < R; r++) {
        float tmp[PANEL];
        for (int c = 0; c < C; c++)
            *(v8_u *)(tmp + 8 * c) = acc[r][c];
        float *yr = y + r * y_stride + c0;
        const int n = cols - c0 < 8 * C ? cols - c0 : 8 * C;
        store_row(yr, tmp, n, bias ? bias + c0 : NULL, accumulate);
    }
}

/* m rows (at most SMALL_M) against one panel: every row over a block of KB_AVX2 k-pairs, one after
 * another, with the whole panel width; partial sums in `sums` between blocks. Per output the same
 * products in the same order as tile8's. */
ALWAYS_INLINE void rows_avx2(float *y, int64_t y_stride, const float *xf, int64_t kp, const uint16_t *panel,
                             const float *bias, int64_t m, int cols, int accumulate)
{
    float sums[SMALL_M * PANEL] __attribute__((aligned(32)));
    const v8i hi_mask = {-65536, -65536, -65536, -65536, -65536, -65536, -65536, -65536};
    for (int64_t j0 = 0; j0 < kp; j0 += KB_AVX2) {
        const int64_t j1 = kp - j0 < KB_AVX2 ? kp : j0 + KB_AVX2;
        for (int64_t r = 0; r < m; r++) {
            const float *xr = xf + r * 2 * kp;
            float *s = sums + r * PANEL;
            v8 acc[8];
            for (int c = 0; c < 8; c++)
                acc[c] = j0 == 0 ? (v8){0, 0, 0, 0, 0, 0, 0, 0} : (v8)*(const v8_u *)(s + 8 * c);
            for (int64_t j = j0; j < j1; j++) {
                const int32_t *w = (const int32_t *)(panel + j * 2 * PANEL);
                const float e = xr[2 * j], o = xr[2 * j + 1];
                const v8 ev = {e, e, e, e, e, e, e, e}, ov = {o, o, o, o, o, o, o, o};
                for (int c = 0; c < 8; c++) {
                    const v8i d = *(const v8i_u *)(w + 8 * c);
                    acc[c] += ov * (v8)(d & hi_mask);
                    acc[c] += ev * (v8)(d << 16);
                }
            }
            for (int c = 0; c < 8; c++)
                *(v8_u *)(s + 8 * c) = acc[c];
        }
    }
    for (int64_t r = 0; r < m; r++)
        store_row(y + r * y_stride, sums + r * PANEL, cols, bias, accumulate);
}

__attribute__((target("avx2,fma"))) static void panel_avx2(
    float *y, int64_t y_stride, const uint32_t *xs, const float *xf, int64_t kp, const uint16_t *panel,
    const float *bias, int64_t m, int cols, int accumulate)
{
    (void)xs;
    if (m == 1) {
        tile8(1, 8, y, y_stride, xf, kp, panel, 0, cols, bias, accumulate);
        return;
    }
    if (m <= SMALL_M) {
        rows_avx2(y, y_stride, xf, kp, panel, bias, m, cols, accumulate);
        return;
    }
    for (int64_t r0 = 0; r0 < m; r0 += ROWS) {
        float *yr = y + r0 * y_stride;
        const float *xr = xf + r0 * 2 * kp;
        for (int c0 = 0; c0 < cols; c0 += 16) {
            switch (m - r0 < ROWS ? (int)(m - r0) : ROWS) {
            case 1: tile8(1, 2, yr, y_stride, xr, kp, panel, c0, cols, bias, accumulate); break;
            case 2: tile8(2, 2, yr, y_stride, xr, kp, panel, c0, cols, bias, accumulate); break;
            case 3: tile8(3, 2, yr, y_stride, xr, kp, panel, c0, cols, bias, accumulate); break;
            case 4: tile8(4, 2, yr, y_stride, xr, kp, panel, c0, cols, bias, accumulate); break;
            case 5: tile8(5, 2, yr, y_stride, xr, kp, panel, c0, cols, bias, accumulate); break;
            default: tile8(6, 2, yr, y_stride, xr, kp, panel, c0, cols, bias, accumulate); break;
            }
        }
    }
}

/* The vdpbf16ps tile: per k-pair 4 weight loads and R broadcasts of x's pair serve R x 4 dot steps
 * (2 k each), half the instructions of panel_mm's float32 tile for the same work. */
#define DP_TARGET __attribute__((target("avx512f,avx512bf16")))
DP_TARGET ALWAYS_INLINE void tile_dp(const int R, float *y, int64_t y_stride, const uint32_t *xs, int64_t kp,
                                     const uint16_t *panel, int64_t j0, int64_t j1, int cols, const float *bias,
                                     int accumulate, int64_t prefetch, float *park, int first, int last)
{
    __m512 acc[ROWS][4];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < 4; v++)
            acc[r][v] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(park + r * PANEL + v * 16);
    for (int64_t j = j0; j < j1; j++) {
        const uint16_t *w = panel + j * 2 * PANEL;
        if (prefetch)
            for (int l = 0; l < 4; l++)
                _mm_prefetch((const char *)(w + prefetch * 2 * PANEL + l * 32), _MM_HINT_T0);
        __m512i w0 = _mm512_loadu_si512(w), w1 = _mm512_loadu_si512(w + 32);
        __m512i w2 = _mm512_loadu_si512(w + 64), w3 = _mm512_loadu_si512(w + 96);
        for (int r = 0; r < R; r++) {
            __m512bh xp = (__m512bh)_mm512_set1_epi32((int)xs[r * kp + j]);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xp, (__m512bh)w0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xp, (__m512bh)w1);
            acc[r][2] = _mm512_dpbf16_ps(acc[r][2], xp, (__m512bh)w2);
            acc[r][3] = _mm512_dpbf16_ps(acc[r][3], xp, (__m512bh)w3);
        }
    }
    for (int r = 0; r < R; r++) {
        float tmp[PANEL], *dst = last ? tmp : park + r * PANEL;
        for (int v = 0; v < 4; v++)
            _mm512_storeu_ps(dst + v * 16, acc[r][v]);
        if (last)
            store_row(y + r * y_stride, tmp, cols, bias, accumulate);
    }
}

DP_TARGET static void panel_dp(float *y, int64_t y_stride, const uint32_t *xs, const float *xf, int64_t kp,
                               const uint16_t *panel, const float *bias, int64_t m, int cols, int accumulate)
{
    (void)xf;
    ONE_PANEL(tile_dp)
}
#endif

int kvos_panel_bf16_has_dp(void)
{
#ifdef HAVE_DP
    return kvos_cpu_avx512() && __builtin_cpu_supports("avx512bf16");
#else
    return 0;
#endif
}

/* x's rows as bf16 pairs, rounded once per call (not once per panel): pair j of row r is
 * (x[r][2j] low half, x[r][2j + 1] high half), the odd k's missing partner 0. */
static void pairs_of(uint32_t *xs, const void *x, int x_bf16, int64_t x_stride, int64_t m, int64_t k, int64_t kp)
{
    for (int64_t r = 0; r < m; r++) {
        uint16_t row[2];
        for (int64_t j = 0; j < kp; j++) {
            for (int t = 0; t < 2; t++) {
                int64_t c = 2 * j + t;
                if (c >= k)
                    row[t] = 0;
                else if (x_bf16)
                    row[t] = ((const uint16_t *)x)[r * x_stride + c];
                else
                    row[t] = kvos_float_to_bf16(((const float *)x)[r * x_stride + c]);
            }
            xs[r * kp + j] = (uint32_t)row[0] | (uint32_t)row[1] << 16;
        }
    }
}

int kvos_panel_mm_bf16(float *y, int64_t y_stride, const void *x, int x_bf16, int64_t x_stride,
                       const uint16_t *packed, const float *bias, int64_t m, int64_t k, int64_t n, int accumulate,
                       int path)
{
    panel_fn *fn = panel_c;
    int widen = 0;      /* the AVX2 tile reads x's pairs as floats */
#ifdef HAVE_DP
    if (path != 1 && kvos_panel_bf16_has_dp())
        fn = panel_dp;
    else if (kvos_cpu_avx512())
        fn = panel_c512;
    else if (kvos_cpu_avx2()) {
        fn = panel_avx2;
        widen = 1;
    }
#endif
    int64_t kp = (k + 1) / 2;
    uint32_t *xs = malloc((size_t)(m * kp) * (sizeof *xs + (widen ? 2 * sizeof(float) : 0)) + 1);
    if (!xs)
        return KVOS_E_NOMEM;
    pairs_of(xs, x, x_bf16, x_stride, m, k, kp);
    float *xf = widen ? (float *)(xs + m * kp) : NULL;
    for (int64_t i = 0; widen && i < m * kp; i++) {
        xf[2 * i] = kvos_bf16_to_float((uint16_t)xs[i]);
        xf[2 * i + 1] = kvos_bf16_to_float((uint16_t)(xs[i] >> 16));
    }
    int64_t panels = (n + PANEL - 1) / PANEL;
    #pragma omp parallel for schedule(static) num_threads(kvos_num_threads()) if (panels > 1 && m * k * n > 65536)
    for (int64_t p = 0; p < panels; p++)
        fn(y + p * PANEL, y_stride, xs, xf, kp, packed + p * kp * 2 * PANEL, bias ? bias + p * PANEL : NULL, m,
           (int)(n - p * PANEL < PANEL ? n - p * PANEL : PANEL), accumulate);
    free(xs);
    return KVOS_OK;
}
