/* panel_mm: y = x @ W^T (+ bias, + y) in float32 for small M, W packed in column panels.
 * W (n, k) is packed once at load (kernel/ops/panel.py) as (panels, k, PANEL) floats: PANEL
 * output columns, k contiguous inside a panel, the last panel padded with zeros. One pass
 * streams every panel linearly and each weight vector, once loaded, serves all M rows of x
 * (register tiles of ROWS rows x PANEL columns); rows beyond ROWS re-read the panel from L2. A W of
 * few rows (a LoRA adapter's A) comes in narrow panels of 16 columns instead (kvos_panel_mm_narrow).
 * Unchecked: kernel/ops/dispatch.py checks shapes, strides and overlap before the call. */
#include <omp.h>
#include "kvos_cpu.h"
#include "simd.h"

#define PANEL 64        /* columns per panel: 4 vectors, one register tile's width */
#define ROWS 6          /* rows per tile: 6 x 4 accumulators + 4 weight vectors fit 32 registers */
#define PREFETCH 16     /* k steps (4 KB) ahead that the first tile of a panel prefetches it */

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* cols sums of an output row into y (+ bias, + y): only the panel's real columns, never the padding. */
ALWAYS_INLINE void store_cols(float *y, const float *sums, int cols, const float *bias, int accumulate)
{
    for (int c = 0; c < cols; c++) {
        float s = bias ? sums[c] + bias[c] : sums[c];
        y[c] = accumulate ? y[c] + s : s;
    }
}

/* One output row of a 64-column tile. */
ALWAYS_INLINE void store_row(float *y, const vf acc[4], int cols, const float *bias, int accumulate)
{
    float tmp[PANEL];
    for (int v = 0; v < 4; v++)
        vstore(tmp + v * VW, acc[v]);
    store_cols(y, tmp, cols, bias, accumulate);
}

/* R rows of x against one panel over all k, R a constant after inlining (so acc stays in
 * registers). k runs in order for every output: the sum is one FMA chain per element. */
ALWAYS_INLINE void tile(const int R, float *y, int64_t y_stride, const float *x, int64_t x_stride,
                        const float *panel, int64_t k, int cols, const float *bias, int accumulate,
                        int prefetch)
{
    vf acc[ROWS][4];
    for (int r = 0; r < R; r++)
        acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = vsplat(0.0f);
    for (int64_t kk = 0; kk < k; kk++) {
        const float *w = panel + kk * PANEL;
        if (PREFETCH && prefetch)   /* later tiles of the panel find it in L2 */
            for (int l = 0; l < 4; l++)
                __builtin_prefetch(w + PREFETCH * PANEL + l * VW);
        vf w0 = vload(w), w1 = vload(w + VW), w2 = vload(w + 2 * VW), w3 = vload(w + 3 * VW);
        for (int r = 0; r < R; r++) {
            vf xr = vsplat(x[r * x_stride + kk]);
            acc[r][0] += xr * w0;
            acc[r][1] += xr * w1;
            acc[r][2] += xr * w2;
            acc[r][3] += xr * w3;
        }
    }
    for (int r = 0; r < R; r++)
        store_row(y + r * y_stride, acc[r], cols, bias, accumulate);
}

/* One panel against all m rows: its row tiles one after another (the first streams it from memory). */
ALWAYS_INLINE void one_panel(float *y, int64_t y_stride, const float *x, int64_t x_stride, const float *panel,
                             const float *bias, int64_t m, int64_t k, int cols, int accumulate)
{
    for (int64_t r0 = 0; r0 < m; r0 += ROWS) {
        const float *xr = x + r0 * x_stride;
        float *yr = y + r0 * y_stride;
        int pf = r0 == 0;
        switch (m - r0 < ROWS ? (int)(m - r0) : ROWS) {
        case 1: tile(1, yr, y_stride, xr, x_stride, panel, k, cols, bias, accumulate, pf); break;
        case 2: tile(2, yr, y_stride, xr, x_stride, panel, k, cols, bias, accumulate, pf); break;
        case 3: tile(3, yr, y_stride, xr, x_stride, panel, k, cols, bias, accumulate, pf); break;
        case 4: tile(4, yr, y_stride, xr, x_stride, panel, k, cols, bias, accumulate, pf); break;
        case 5: tile(5, yr, y_stride, xr, x_stride, panel, k, cols, bias, accumulate, pf); break;
        default: tile(6, yr, y_stride, xr, x_stride, panel, k, cols, bias, accumulate, pf); break;
        }
    }
}

typedef void panel_fn(float *, int64_t, const float *, int64_t, const float *, const float *, int64_t, int64_t,
                      int, int);

#if defined(__x86_64__) && defined(__GNUC__)
/* The same code for AVX-512 whatever the build's -march, chosen at run time. (The OpenMP loop stays
 * outside: GCC outlines a parallel region without its enclosing function's target attribute.) */
__attribute__((target("avx512f,fma"))) static void panel_avx512(
    float *y, int64_t y_stride, const float *x, int64_t x_stride, const float *panel, const float *bias,
    int64_t m, int64_t k, int cols, int accumulate)
{
    one_panel(y, y_stride, x, x_stride, panel, bias, m, k, cols, accumulate);
}
#endif

#if defined(__x86_64__) && defined(__GNUC__)
/* AVX2 + FMA (16 vector registers of 8 floats): the AVX-512 tile above, 6 rows x 64 columns, would
 * need 48 accumulators and spills on every k step (measured 4-11x slower than MKL on such a CPU). One
 * row takes the whole panel (8 accumulators: decode at batch 1 streams each panel once). Up to SMALL_M
 * rows do the same row after row over blocks of KB k steps (rows_avx2): the first row streams a block
 * from memory, the others find it in L1, and each keeps its partial sums between blocks. More rows go
 * 6 at a time over quarters of the panel (6 x 2 accumulators, 2 weight vectors, 1 broadcast: MKL's
 * own AVX2 shape), which does more FMAs per load but reads the panel a quarter of a row at a time:
 * at 2 to 16 rows that made every row cost about what the first does (M = 2 took 1.9x M = 1's time,
 * M = 8 3x), at 128 and more the row blocks take 12-13% longer (docs/performance.md, section 17). */
#define KB 64           /* k steps of a row block: 16 KB of panel, in L1 while every row runs over it */
#define SMALL_M 64      /* rows up to which the row blocks run (their partial sums: 16 KB of stack) */

ALWAYS_INLINE void tile8(const int R, const int C, float *y, int64_t y_stride, const float *x, int64_t x_stride,
                         const float *panel, int64_t k, int c0, int cols, const float *bias, int accumulate)
{
    v8 acc[6][8];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++)
            acc[r][c] = (v8){0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t kk = 0; kk < k; kk++) {
        const float *w = panel + kk * PANEL + c0;
        v8 wv[8];
        for (int c = 0; c < C; c++)
            wv[c] = *(const v8_u *)(w + 8 * c);
        for (int r = 0; r < R; r++) {
            const float xs = x[r * x_stride + kk];
            const v8 xr = {xs, xs, xs, xs, xs, xs, xs, xs};
            for (int c = 0; c < C; c++)
                acc[r][c] += xr * wv[c];
        }
    }
    for (int r = 0; r < R; r++) {
        float tmp[64];
        for (int c = 0; c < C; c++)
            *(v8_u *)(tmp + 8 * c) = acc[r][c];
        const int n = cols - c0 < 8 * C ? cols - c0 : 8 * C;
        store_cols(y + r * y_stride + c0, tmp, n, bias ? bias + c0 : NULL, accumulate);
    }
}

/* m rows (at most SMALL_M) against one panel: every row over a block of KB k steps, one after
 * another, each with the whole panel width; partial sums in `sums` between blocks. Each output is
 * the same FMA chain over k in order as tile8's, so the results are the same to the bit. */
ALWAYS_INLINE void rows_avx2(float *y, int64_t y_stride, const float *x, int64_t x_stride, const float *panel,
                             const float *bias, int64_t m, int64_t k, int cols, int accumulate)
{
    float sums[SMALL_M * PANEL] __attribute__((aligned(32)));
    for (int64_t k0 = 0; k0 < k; k0 += KB) {
        const int64_t kn = k - k0 < KB ? k - k0 : KB;
        const float *w = panel + k0 * PANEL;
        for (int64_t r = 0; r < m; r++) {
            const float *xr = x + r * x_stride + k0;
            float *s = sums + r * PANEL;
            v8 acc[8];
            for (int c = 0; c < 8; c++)
                acc[c] = k0 == 0 ? (v8){0, 0, 0, 0, 0, 0, 0, 0} : (v8)*(const v8_u *)(s + 8 * c);
            for (int64_t kk = 0; kk < kn; kk++) {
                const float *wk = w + kk * PANEL;
                const float xs = xr[kk];
                const v8 xv = {xs, xs, xs, xs, xs, xs, xs, xs};
                for (int c = 0; c < 8; c++)
                    acc[c] += xv * *(const v8_u *)(wk + 8 * c);
            }
            for (int c = 0; c < 8; c++)
                *(v8_u *)(s + 8 * c) = acc[c];
        }
    }
    for (int64_t r = 0; r < m; r++)
        store_cols(y + r * y_stride, sums + r * PANEL, cols, bias, accumulate);
}

__attribute__((target("avx2,fma"))) static void panel_avx2(
    float *y, int64_t y_stride, const float *x, int64_t x_stride, const float *panel, const float *bias,
    int64_t m, int64_t k, int cols, int accumulate)
{
    if (m == 1) {
        tile8(1, 8, y, y_stride, x, x_stride, panel, k, 0, cols, bias, accumulate);
        return;
    }
    if (m <= SMALL_M) {
        rows_avx2(y, y_stride, x, x_stride, panel, bias, m, k, cols, accumulate);
        return;
    }
    for (int64_t r0 = 0; r0 < m; r0 += 6) {
        const float *xr = x + r0 * x_stride;
        float *yr = y + r0 * y_stride;
        for (int c0 = 0; c0 < cols; c0 += 16) {
            switch (m - r0 < 6 ? (int)(m - r0) : 6) {
            case 1: tile8(1, 2, yr, y_stride, xr, x_stride, panel, k, c0, cols, bias, accumulate); break;
            case 2: tile8(2, 2, yr, y_stride, xr, x_stride, panel, k, c0, cols, bias, accumulate); break;
            case 3: tile8(3, 2, yr, y_stride, xr, x_stride, panel, k, c0, cols, bias, accumulate); break;
            case 4: tile8(4, 2, yr, y_stride, xr, x_stride, panel, k, c0, cols, bias, accumulate); break;
            case 5: tile8(5, 2, yr, y_stride, xr, x_stride, panel, k, c0, cols, bias, accumulate); break;
            default: tile8(6, 2, yr, y_stride, xr, x_stride, panel, k, c0, cols, bias, accumulate); break;
            }
        }
    }
}
#endif

static void panel_portable(float *y, int64_t y_stride, const float *x, int64_t x_stride, const float *panel,
                           const float *bias, int64_t m, int64_t k, int cols, int accumulate)
{
    one_panel(y, y_stride, x, x_stride, panel, bias, m, k, cols, accumulate);
}

/* Every panel of `width` columns through fn, each over its k rows [kranges[2p], kranges[2p + 1]) (all k
 * without kranges). Threads from 64K multiply-adds, or from 64 KB of weights at fewer rows (a LoRA
 * delta's B at one row: k = r, thousands of columns, its bytes the cost). */
static void run_panels(panel_fn *fn, int64_t width, float *y, int64_t y_stride, const float *x, int64_t x_stride,
                       const float *packed, const int32_t *kranges, const float *bias, int64_t m, int64_t k,
                       int64_t n, int accumulate)
{
    const int64_t panels = (n + width - 1) / width;
    #pragma omp parallel for schedule(static) num_threads(kvos_num_threads()) \
        if (panels > 1 && (m * k * n > 65536 || k * n > 16384))
    for (int64_t p = 0; p < panels; p++) {
        const int64_t k0 = kranges ? kranges[2 * p] : 0, k1 = kranges ? kranges[2 * p + 1] : k;
        const int cols = (int)(n - p * width < width ? n - p * width : width);
        if (k1 == k0) {            /* an all-zero panel: its sums are 0 (the tiles need one k step) */
            if (!accumulate || bias)
                for (int64_t r = 0; r < m; r++)
                    for (int c = 0; c < cols; c++) {
                        const float s = bias ? 0.0f + bias[p * width + c] : 0.0f;
                        float *out = y + r * y_stride + p * width + c;
                        *out = accumulate ? *out + s : s;
                    }
            continue;              /* y + 0 is y: a sum of products is never -0 */
        }
        fn(y + p * width, y_stride, x + k0, x_stride, packed + (p * k + k0) * width,
           bias ? bias + p * width : NULL, m, k1 - k0, cols, accumulate);
    }
}

static panel_fn *wide_panel_fn(void)
{
#if defined(__x86_64__) && defined(__GNUC__)
    if (kvos_cpu_avx512())
        return panel_avx512;
    if (kvos_cpu_avx2())
        return panel_avx2;
#endif
    return panel_portable;
}

void kvos_panel_mm(float *y, int64_t y_stride, const float *x, int64_t x_stride, const float *packed,
                   const float *bias, int64_t m, int64_t k, int64_t n, int accumulate)
{
    run_panels(wide_panel_fn(), PANEL, y, y_stride, x, x_stride, packed, NULL, bias, m, k, n, accumulate);
}

/* Leading and trailing zero rows of a panel skipped: the chain starts at +0 either way (+0 plus a
 * product with a zero weight is +0) and ends the same (a sum of products is never -0, and s + 0 is s);
 * x's values are finite (an inf times a skipped zero would have made a NaN). */
void kvos_panel_mm_kranges(float *y, int64_t y_stride, const float *x, int64_t x_stride, const float *packed,
                           const int32_t *kranges, int64_t m, int64_t k, int64_t n, int accumulate)
{
    run_panels(wide_panel_fn(), PANEL, y, y_stride, x, x_stride, packed, kranges, NULL, m, k, n, accumulate);
}

int kvos_panel_width(void) { return PANEL; }

/* Narrow panels: W (n, k) packed as (panels, k, NARROW) for a W of few rows (a LoRA adapter's A, 8
 * to 24 rows): 64-column panels would read 3 to 8 times its bytes. Tiles of up to NARROW_ROWS rows x
 * one vector; each output is the same FMA chain over k in order as the wide panels' (the same bits). */
#define NARROW 16       /* columns per narrow panel: one vector */
#define NARROW_ROWS 8   /* rows per narrow tile */

ALWAYS_INLINE void tile_narrow(const int R, float *y, int64_t y_stride, const float *x, int64_t x_stride,
                               const float *panel, int64_t k, int cols, const float *bias, int accumulate)
{
    vf acc[NARROW_ROWS];
    for (int r = 0; r < R; r++)
        acc[r] = vsplat(0.0f);
    for (int64_t kk = 0; kk < k; kk++) {
        const vf w = vload(panel + kk * NARROW);
        for (int r = 0; r < R; r++)
            acc[r] += vsplat(x[r * x_stride + kk]) * w;
    }
    for (int r = 0; r < R; r++) {
        float tmp[NARROW];
        vstore(tmp, acc[r]);
        store_cols(y + r * y_stride, tmp, cols, bias, accumulate);
    }
}

ALWAYS_INLINE void one_narrow_panel(float *y, int64_t y_stride, const float *x, int64_t x_stride,
                                    const float *panel, const float *bias, int64_t m, int64_t k, int cols,
                                    int accumulate)
{
    for (int64_t r0 = 0; r0 < m; r0 += NARROW_ROWS) {
        const float *xr = x + r0 * x_stride;
        float *yr = y + r0 * y_stride;
        switch (m - r0 < NARROW_ROWS ? (int)(m - r0) : NARROW_ROWS) {
        case 1: tile_narrow(1, yr, y_stride, xr, x_stride, panel, k, cols, bias, accumulate); break;
        case 2: tile_narrow(2, yr, y_stride, xr, x_stride, panel, k, cols, bias, accumulate); break;
        case 3: tile_narrow(3, yr, y_stride, xr, x_stride, panel, k, cols, bias, accumulate); break;
        case 4: tile_narrow(4, yr, y_stride, xr, x_stride, panel, k, cols, bias, accumulate); break;
        case 5: tile_narrow(5, yr, y_stride, xr, x_stride, panel, k, cols, bias, accumulate); break;
        case 6: tile_narrow(6, yr, y_stride, xr, x_stride, panel, k, cols, bias, accumulate); break;
        case 7: tile_narrow(7, yr, y_stride, xr, x_stride, panel, k, cols, bias, accumulate); break;
        default: tile_narrow(8, yr, y_stride, xr, x_stride, panel, k, cols, bias, accumulate); break;
        }
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f,fma"))) static void narrow_avx512(
    float *y, int64_t y_stride, const float *x, int64_t x_stride, const float *panel, const float *bias,
    int64_t m, int64_t k, int cols, int accumulate)
{
    one_narrow_panel(y, y_stride, x, x_stride, panel, bias, m, k, cols, accumulate);
}

__attribute__((target("avx2,fma"))) static void narrow_avx2(
    float *y, int64_t y_stride, const float *x, int64_t x_stride, const float *panel, const float *bias,
    int64_t m, int64_t k, int cols, int accumulate)
{
    one_narrow_panel(y, y_stride, x, x_stride, panel, bias, m, k, cols, accumulate);
}
#endif

static void narrow_portable(float *y, int64_t y_stride, const float *x, int64_t x_stride, const float *panel,
                            const float *bias, int64_t m, int64_t k, int cols, int accumulate)
{
    one_narrow_panel(y, y_stride, x, x_stride, panel, bias, m, k, cols, accumulate);
}

void kvos_panel_mm_narrow(float *y, int64_t y_stride, const float *x, int64_t x_stride, const float *packed,
                          const float *bias, int64_t m, int64_t k, int64_t n, int accumulate)
{
    panel_fn *fn = narrow_portable;
#if defined(__x86_64__) && defined(__GNUC__)
    if (kvos_cpu_avx512())
        fn = narrow_avx512;
    else if (kvos_cpu_avx2())
        fn = narrow_avx2;
#endif
    run_panels(fn, NARROW, y, y_stride, x, x_stride, packed, NULL, bias, m, k, n, accumulate);
}

int kvos_panel_narrow_width(void) { return NARROW; }
