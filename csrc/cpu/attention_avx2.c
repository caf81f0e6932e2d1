/* CPU paged attention on AVX2 CPUs (16 vector registers of 8 floats), for every task: decode
 * and prefill chunks alike (the lanes path's 16-lane tiles spill there too: this path runs
 * prefill chunks 5.8-6.5x faster than it on SmolLM2's shapes). attention_rows.c keeps a block's q and accumulators in 16-float
 * registers, which on AVX2 become register pairs: four rows of d = 64 ask for 64 of them, and
 * the spills made that path a third of a decode step on such a CPU (perf, a kvos-gguf `mixed`
 * run). Here the working set fits 16 registers: per context token its K row is loaded once
 * in 64-dim chunks (8 registers) and dotted with each row's q straight from L1 (memory
 * operands), the partial vectors of 8 tokens summed across lanes at once (hadd tree); values
 * go one row at a time, a 64-dim chunk of its accumulator (8 registers) in registers over the
 * tile, V rows read from L1. Same tiles, address translation and online softmax as the other
 * paths; head sizes a multiple of 64, float32 caches (bf16 ones widened per tile first; int8 ones: K rows
 * widened in registers, V per tile). */
#include "kvos_cpu.h"
#include "attention.h"
#include "q8.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define AVX2_TARGET __attribute__((target("avx2,fma")))
#define RB 3            /* rows per score block: a GQA group of 3 (SmolLM2) in one pass over K */
#define CHUNK 64        /* dims of K or of an accumulator held in registers at once */

int attn_has_avx2(void)
{
    return kvos_cpu_avx2() && !kvos_cpu_avx512();      /* AVX-512 CPUs keep the 16-lane paths */
}

/* (sum(x0), ..., sum(x7)): four hadds, two lane swaps and an add. */
static inline __attribute__((always_inline)) AVX2_TARGET __m256 hsum8(const __m256 x[8])
{
    const __m256 h0 = _mm256_hadd_ps(x[0], x[1]), h1 = _mm256_hadd_ps(x[2], x[3]);
    const __m256 h2 = _mm256_hadd_ps(x[4], x[5]), h3 = _mm256_hadd_ps(x[6], x[7]);
    const __m256 a = _mm256_hadd_ps(h0, h1), b = _mm256_hadd_ps(h2, h3);
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

/* 8 dims of a K row from i on, as float32: loaded, or for an int8 cache (Q8) widened from its
 * codes in registers (the row's scale is applied to the scores, once a token). */
static inline __attribute__((always_inline)) AVX2_TARGET __m256 load_k(const void *row, int64_t i, const int Q8)
{
    if (Q8)
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)row + i))));
    return _mm256_loadu_ps((const float *)row + i);
}

/* Scores of R rows (r0..) against the tile's first nmax tokens, into w->s (TILE floats a row;
 * entries past nmax are scratch). Tokens past nmax in the last group of 8 repeat token nmax - 1,
 * so every address read is a real row. kp: float32 rows, or int8 rows of codes + scale (Q8),
 * whose dot products with q are scaled by the row's scale: no float32 copy of an int8 K tile. */
static inline __attribute__((always_inline)) AVX2_TARGET void
scores(scratch_t *w, const void *const *kp, int64_t r0, int nmax, const int64_t D, const int R, const int Q8)
{
    for (int g0 = 0; g0 < nmax; g0 += 8) {
        __m256 part[RB][8];
        float ks[8];
        for (int j = 0; j < 8; j++) {
            const void *k = kp[g0 + j < nmax ? g0 + j : nmax - 1];
            if (Q8)
                ks[j] = kvos_q8_scale((const int8_t *)k, D);
            for (int r = 0; r < R; r++)
                part[r][j] = _mm256_setzero_ps();
            for (int64_t c0 = 0; c0 < D; c0 += CHUNK) {
                __m256 kc[8];
                for (int i = 0; i < 8; i++)
                    kc[i] = load_k(k, c0 + 8 * i, Q8);
                for (int r = 0; r < R; r++) {
                    const float *q = w->qs + (r0 + r) * D + c0;
                    __m256 a = _mm256_mul_ps(kc[0], _mm256_loadu_ps(q));
                    __m256 b = _mm256_mul_ps(kc[1], _mm256_loadu_ps(q + 8));
                    for (int i = 2; i < 8; i += 2) {
                        a = _mm256_fmadd_ps(kc[i], _mm256_loadu_ps(q + 8 * i), a);
                        b = _mm256_fmadd_ps(kc[i + 1], _mm256_loadu_ps(q + 8 * i + 8), b);
                    }
                    part[r][j] = _mm256_add_ps(part[r][j], _mm256_add_ps(a, b));
                }
            }
        }
        for (int r = 0; r < R; r++) {
            const __m256 sum = hsum8(part[r]);
            _mm256_storeu_ps(w->s + (r0 + r) * TILE + g0, Q8 ? _mm256_mul_ps(sum, _mm256_loadu_ps(ks)) : sum);
        }
    }
}

/* kvos_exp2 on 8 lanes: the same clamps, rounding trick and polynomial (fused as the scalar one is). */
static inline __attribute__((always_inline)) AVX2_TARGET __m256 exp2_8(__m256 x)
{
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-126.0f)), _mm256_set1_ps(127.0f));
    const __m256 magic = _mm256_set1_ps(KVOS_ROUND_MAGIC);
    const __m256 n = _mm256_sub_ps(_mm256_add_ps(x, magic), magic), f = _mm256_sub_ps(x, n);
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(1.535336188319500e-4f), f, _mm256_set1_ps(1.339887440266574e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618437357674640e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550332471162809e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264791363012e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931472028550421e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

/* attn_softmax_tile 8 scores at a time (the scalar loop was a quarter of this path's time): the
 * row's n valid scores of a tile of tn become weights (0 past n); returns the accumulator's factor.
 * s has TILE floats, so whole vectors up to tn rounded up to 8 are in bounds. */
static inline __attribute__((always_inline)) AVX2_TARGET float softmax8(float *s, int n, int tn, float *m, float *l)
{
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 mx = _mm256_set1_ps(KVOS_NEG_BIG);
    for (int t = 0; t < n; t += 8) {
        const __m256 valid = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n - t), lane));
        mx = _mm256_max_ps(mx, _mm256_blendv_ps(_mm256_set1_ps(KVOS_NEG_BIG), _mm256_loadu_ps(s + t), valid));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    const float alpha = kvos_softmax_rescale(m, _mm_cvtss_f32(m4));
    const __m256 top = _mm256_set1_ps(*m);
    __m256 sum = _mm256_setzero_ps();
    for (int t = 0; t < tn; t += 8) {
        const __m256 valid = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n - t), lane));
        const __m256 p = _mm256_and_ps(exp2_8(_mm256_sub_ps(_mm256_loadu_ps(s + t), top)), valid);
        _mm256_storeu_ps(s + t, p);
        sum = _mm256_add_ps(sum, p);
    }
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
    s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    s4 = _mm_add_ss(s4, _mm_shuffle_ps(s4, s4, 1));
    *l = *l * alpha + _mm_cvtss_f32(s4);
    return alpha;
}

/* acc[r] = acc[r] * alpha + sum over the tile's nmax tokens of p[t] * v[t], 64 dims at a time. */
static inline __attribute__((always_inline)) AVX2_TARGET void
values(scratch_t *w, const float *const *vp, int64_t r, int nmax, float alpha, const int64_t D)
{
    const float *p = w->s + r * TILE;
    for (int64_t c0 = 0; c0 < D; c0 += CHUNK) {
        float *acc = w->acc + r * D + c0;
        const __m256 al = _mm256_set1_ps(alpha);
        __m256 o[8];
        for (int i = 0; i < 8; i++)
            o[i] = _mm256_mul_ps(_mm256_loadu_ps(acc + 8 * i), al);
        for (int t = 0; t < nmax; t++) {
            const __m256 pt = _mm256_broadcast_ss(p + t);
            const float *v = vp[t] + c0;
            for (int i = 0; i < 8; i++)
                o[i] = _mm256_fmadd_ps(pt, _mm256_loadu_ps(v + 8 * i), o[i]);
        }
        for (int i = 0; i < 8; i++)
            _mm256_storeu_ps(acc + 8 * i, o[i]);
    }
}

/* An int8 cache's V tile widened into w->tv (attn_tile_ready's bytes: code * scale, one rounding),
 * 8 dims a step with D a constant. The generic loop of q8.h, called a row at a time with D unknown
 * to it, went through 16-bit sign extension and lane extracts: 28% of a hot int8 decode call (perf). */
static inline __attribute__((always_inline)) AVX2_TARGET void
widen_v(scratch_t *w, int cur, int tn, const int64_t D)
{
    for (int t = 0; t < tn; t++) {
        const int8_t *row = w->vp8[cur][t];
        float *dst = w->tv + t * D;
        const __m256 scale = _mm256_set1_ps(kvos_q8_scale(row, D));
        for (int64_t i = 0; i < D; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_mul_ps(load_k(row, i, 1), scale));
        w->vp[cur][t] = dst;
    }
}

static inline __attribute__((always_inline)) AVX2_TARGET void
tile(scratch_t *w, int cur, int64_t rows, int64_t t0, int tn, const int64_t D, const int Q8)
{
    const void *const *kp = Q8 ? (const void *const *)w->kp8[cur] : (const void *const *)w->kp[cur];
    const float *const *vp = w->vp[cur];
    for (int64_t r0 = 0; r0 < rows; r0 += RB) {
        const int R = rows - r0 < RB ? (int)(rows - r0) : RB;
        int n[RB];
        const int nmax = attn_tile_counts(w, r0, R, t0, tn, n);
        if (nmax == 0)
            continue;       /* causal: these rows ended in an earlier tile */
        if (R == 3) scores(w, kp, r0, nmax, D, 3, Q8);
        else if (R == 2) scores(w, kp, r0, nmax, D, 2, Q8);
        else scores(w, kp, r0, nmax, D, 1, Q8);
        for (int r = 0; r < R; r++) {
            float *s = w->s + (r0 + r) * TILE;
            float alpha = 1.0f;
            if (n[r])
                alpha = softmax8(s, n[r], nmax, &w->m[r0 + r], &w->l[r0 + r]);
            else
                for (int t = 0; t < nmax; t++)
                    s[t] = 0.0f;
            values(w, vp, r0 + r, nmax, alpha, D);
        }
    }
}

static inline __attribute__((always_inline)) AVX2_TARGET void
run(const call_t *c, const task_t *task, int64_t h, scratch_t *w, const int64_t D, const int Q8)
{
    const int64_t rows = task_rows(c, task);
    const int64_t n_ctx = attn_limits(c, task, w);
    attn_start_rows(c, task, h, w);
    attn_translate_ahead(c, task, h, 0, n_ctx, w, 0);
    int cur = 0;
    for (int64_t t0 = 0; t0 < n_ctx; t0 += TILE, cur ^= 1) {
        const int tn = (int)(n_ctx - t0 < TILE ? n_ctx - t0 : TILE);
        /* the next tile's addresses, not prefetched row by row: its rows come one page at a time, a
         * stride the hardware prefetcher follows; prefetching them a token at a time cost 5-10% and
         * won nothing (int8 rows too: cold tiles 5-20% faster, hot ones 5-40% slower, a mixed run no
         * different). An int8 cache's head 0 prefetches whole page spans instead, for every head. */
        const int next = attn_translate_tile(c, task, h, t0 + TILE, n_ctx, w, cur ^ 1, 0);
        if (Q8 && h == 0)
            attn_prefetch_heads(c, w, cur ^ 1, next);
        /* bf16 caches: the tile widened to float32; int8 ones: its V only (scores widen K in registers) */
        if (Q8)
            widen_v(w, cur, tn, D);
        else
            attn_tile_ready(c, w, cur, tn);
        tile(w, cur, rows, t0, tn, D, Q8);
    }
    attn_finish_rows(c, task, h, w);
}

int attn_task_rows_avx2(const call_t *c, const task_t *task, int64_t h, scratch_t *w)
{
    switch (c->head_dim) {      /* D a constant in each copy: the chunk loops unroll */
    case 64: if (c->k8) run(c, task, h, w, 64, 1); else run(c, task, h, w, 64, 0); return 1;
    case 128: if (c->k8) run(c, task, h, w, 128, 1); else run(c, task, h, w, 128, 0); return 1;
    default: return 0;
    }
}
#else
int attn_has_avx2(void) { return 0; }
int attn_task_rows_avx2(const call_t *c, const task_t *task, int64_t h, scratch_t *w)
{
    (void)c; (void)task; (void)h; (void)w;
    return 0;
}
#endif
