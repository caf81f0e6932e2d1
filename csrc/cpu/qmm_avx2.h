/* qmm's AVX2 path (no VNNI: vpmaddubsw + vpmaddwd give vpdpbusd's integers), 4 and 8 bits, and
 * the activations' quantization in 8-lane vectors. One translation unit with qmm.c: included once by
 * it, after qmm_vnni.h (alias_i32, prefetch_ahead). HAVE_AVX2_PATH says whether it was compiled. */
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
