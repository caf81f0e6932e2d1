/* qmm's AMX path (Intel AMX-INT8: tdpbsud, s8 activations x u8 weight codes), for calls of 16 rows
 * and more. A record's eight 64-byte vectors (16 columns x 4 k each) are already a B tile of 8 rows
 * x 64 bytes: one tdpbsud gives a block's integer dots for 16 rows x 16 columns, which the VNNI
 * path needs 128 vpdpbusd for. Its float epilogue is the VNNI path's, operation for operation, so
 * the two give the same bits (a row's result does not depend on which path its step took). Rows
 * past the last multiple of 16 run on the VNNI tiles. One translation unit with qmm.c, included
 * after qmm_vnni.h. Callers bracket a thread's tiles with qmm_amx_begin / qmm_amx_end (tile
 * configuration is per thread); HAVE_AMX_PATH says whether it was compiled. */
#if HAVE_VNNI_PATH && defined(__linux__) && (defined(__clang__) || __GNUC__ >= 11)
#include <sys/syscall.h>
long syscall(long number, ...);     /* unistd.h declares it only outside strict C11 */
#define AMX_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c,amx-tile,amx-int8")))
#define HAVE_AMX_PATH 1
#define AMX_ROWS 16             /* rows of an activation tile and of a result tile */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* ldtilecfg's 64-byte operand (palette 1). Tiles 0/3: results (16 rows x 16 int32); 1/4:
 * activations (16 rows x one 32-byte block); 2/5: weights (8 rows of 16 columns x 4 k). Two sets,
 * used in turn, so that one block's loads need not wait for the previous block's store. */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed, aligned(64))) amx_config;

/* CPUID says AMX-TILE and AMX-INT8; Linux hands a process the tile state only when asked
 * (arch_prctl), once. -1 unknown, 0 no, 1 yes. */
static int amx_usable = -1;

static int amx_cpu_and_os(void)
{
    unsigned int eax, ebx, ecx, edx;
    __asm__ volatile("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(7), "c"(0));
    if (!((edx >> 24) & 1) || !((edx >> 25) & 1))
        return 0;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

static int qmm_amx_available(void)
{
    if (amx_usable < 0)
        amx_usable = amx_cpu_and_os();
    return amx_usable && kvos_qmm_has_vnni();     /* the cap (isa.c) lowers it with the VNNI path */
}

static AMX_TARGET void qmm_amx_begin(void)
{
    amx_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int set = 0; set < 2; set++) {
        const int c = 3 * set, a = c + 1, b = c + 2;
        cfg.rows[c] = AMX_ROWS, cfg.colsb[c] = 64;
        cfg.rows[a] = AMX_ROWS, cfg.colsb[a] = BLOCK;
        cfg.rows[b] = BLOCK / 4, cfg.colsb[b] = 64;
    }
    _tile_loadconfig(&cfg);
}

static AMX_TARGET void qmm_amx_end(void) { _tile_release(); }

/* One block's dots on tiles C (results), A (activations), B (weights), stored to dots. The tile
 * numbers are literals: the intrinsics paste them into register names. */
#define AMX_BLOCK_DOTS(C, A, B, q, q_stride, codes, dots)       \
    do {                                                        \
        _tile_loadd(A, (q), (q_stride));                        \
        _tile_loadd(B, (codes), 64);                            \
        _tile_zero(C);                                          \
        _tile_dpbsud(C, A, B);                                  \
        _tile_stored(C, (dots), 64);                            \
    } while (0)

/* 16 rows' float results from their blocks' dots (kb x 16 x 16 int32): the VNNI path's
 * epilogue. Apart from the tile instructions, whose asm would keep the accumulators in memory.
 * scales holds the 16 rows' d then d * sum block by block (kb x 2 x 16 floats, amx_scales):
 * one base pointer, where 32 row pointers would not fit the registers. */
static inline __attribute__((always_inline)) AMX_TARGET void
amx_rows_out(float *y, int64_t y_stride, const int32_t *dots, const float *scales, int64_t kb, int64_t r0,
             const uint8_t *tile, int64_t rb, int64_t cb, int cols)
{
    __m512 acc[AMX_ROWS];
    #pragma GCC unroll 16
    for (int r = 0; r < AMX_ROWS; r++)
        acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < kb; b++) {
        const uint8_t *rec = tile + b * rb;
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(rec + cb)));
        const __m512 mw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(rec + cb + 32)));
        const float *dx = scales + b * 2 * AMX_ROWS, *xs = dx + AMX_ROWS;
        #pragma GCC unroll 16
        for (int r = 0; r < AMX_ROWS; r++) {
            const __m512i s = _mm512_load_si512((const void *)(dots + (b * AMX_ROWS + r) * 16));
            const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(dx[r]));
            acc[r] = _mm512_fmadd_ps(f, dw, acc[r]);
            acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(xs[r]), acc[r]);
        }
    }
    const __mmask16 keep = (__mmask16)((1u << cols) - 1);
    #pragma GCC unroll 16
    for (int r = 0; r < AMX_ROWS; r++)
        _mm512_mask_storeu_ps(y + (r0 + r) * y_stride, keep, acc[r]);
}

/* Row group g's d and d * sum, block-major (see amx_rows_out), at scales + g * kb * 32: made once
 * a call, after the quantization, for every tile's use. */
static void amx_scales(float *scales, const qrows *a, int64_t g)
{
    float *out = scales + g * a->kb * 2 * AMX_ROWS;
    for (int64_t b = 0; b < a->kb; b++)
        for (int r = 0; r < AMX_ROWS; r++) {
            out[b * 2 * AMX_ROWS + r] = a->dx[(g * AMX_ROWS + r) * a->kb + b];
            out[b * 2 * AMX_ROWS + AMX_ROWS + r] = a->xs[(g * AMX_ROWS + r) * a->kb + b];
        }
}

/* All m rows against one tile of 16 columns. 4-bit codes are unpacked once into codes (the
 * tile's blocks at 512 bytes each, kb of them), 8-bit ones are read in place. Then, 16 rows at a
 * time: every block's dots into dots (kb x 1 KB, the two tile sets in turn), then their epilogue
 * with the group's scales (amx_scales). */
static inline __attribute__((always_inline)) AMX_TARGET void
qmm_amx_tile(float *y, int64_t y_stride, const qrows *a, int64_t m, const uint8_t *tile, int cols, uint8_t *codes,
             int32_t *dots, float *scales, const int BITS)
{
    const int64_t rb = record_bytes(BITS), cb = code_bytes(BITS), kb = a->kb, full = m / AMX_ROWS * AMX_ROWS;
    const uint8_t *block_codes = tile;
    int64_t codes_step = rb;
    if (BITS == 4) {
        const __m512i low = _mm512_set1_epi8(15);
        for (int64_t b = 0; b < kb; b++) {
            const uint8_t *rec = tile + b * rb;
            prefetch_ahead(tile, b, rb);
            for (int v = 0; v < 4; v++) {
                __m512i p = _mm512_loadu_si512((const void *)(rec + 64 * v));
                _mm512_store_si512((void *)(codes + b * 512 + 64 * v), _mm512_and_si512(p, low));
                _mm512_store_si512((void *)(codes + b * 512 + 64 * (v + 4)),
                                   _mm512_and_si512(_mm512_srli_epi16(p, 4), low));
            }
        }
        block_codes = codes, codes_step = 512;
    }
    __asm__ volatile("" ::: "memory");     /* the unpacked codes are in memory before a tile reads them */
    const int64_t q_stride = kb * BLOCK;
    for (int64_t r0 = 0; r0 < full; r0 += AMX_ROWS) {
        const int8_t *q = a->q + r0 * q_stride;
        int64_t b = 0;
        for (; b + 1 < kb; b += 2) {
            if (BITS == 8 && r0 == 0)
                prefetch_ahead(tile, b, rb);
            AMX_BLOCK_DOTS(0, 1, 2, q + b * BLOCK, q_stride, block_codes + b * codes_step, dots + b * 256);
            AMX_BLOCK_DOTS(3, 4, 5, q + (b + 1) * BLOCK, q_stride, block_codes + (b + 1) * codes_step,
                           dots + (b + 1) * 256);
        }
        if (b < kb)
            AMX_BLOCK_DOTS(0, 1, 2, q + b * BLOCK, q_stride, block_codes + b * codes_step, dots + b * 256);
        amx_rows_out(y, y_stride, dots, scales + r0 * kb * 2, kb, r0, tile, rb, cb, cols);
    }
    if (full < m) {     /* the last rows on the VNNI tiles: same bits */
        const qrows rest = {a->q + full * q_stride, a->dx + full * kb, a->xs + full * kb, kb, NULL};
        if (BITS == 4)
            qmm_vnni_tile4(y + full * y_stride, y_stride, &rest, m - full, tile, cols);
        else
            qmm_vnni_tile8(y + full * y_stride, y_stride, &rest, m - full, tile, cols);
    }
}
#else
#define HAVE_AMX_PATH 0
#endif
