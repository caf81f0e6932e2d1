/* The rows path of CPU paged attention: for groups of fewer than 12 query heads per kv head
 * (decode and prefill: a row's bits must not depend on its task) and for groups wider than 32. Rows go in blocks of up to four;
 * per context token the block's dot products are vector partial sums, and 16 tokens are
 * summed across lanes at once (vsum16). q and the output accumulators of a block stay in
 * registers for a tile. bf16 and int8 cache rows are widened in registers as a block loads
 * them; an int8 row's scale multiplies its summed score (K) or its weight (V), once, not each
 * widened chunk. Head sizes not a multiple of 16 take a scalar-loop variant over tiles
 * widened first (attn_tile_ready: code * scale). */
#include "kvos_cpu.h"
#include "attention.h"
#include "simd.h"
#include "q8.h"

enum { F32 = 0, BF16 = 1, Q8 = 2 };     /* what a cache row holds: tile_block's KIND */

/* Chunk ch (16 dims) of row t of a tile, as float32, for a cache of KIND; int8: the codes, unscaled
 * (tile_block applies K's scale to the summed scores and V's to the weights). */
static inline __attribute__((always_inline)) vf
row_chunk(const float *const *p, const uint16_t *const *p16, const int8_t *const *p8, int t, int ch, const int KIND)
{
    if (KIND == BF16)
        return vload_bf16(p16[t] + ch * LANES);
    if (KIND == Q8)
        return vload_i8(p8[t] + ch * LANES);
    return vload(p[t] + ch * LANES);
}

/* RB rows (r0..r0+RB-1) against one tile, D and RB compile-time constants (D a multiple
 * of 16, RB * D <= 256 so that q or the accumulators fit the 32 vector registers).
 * KIND: F32 rows through kp/vp; BF16 (kp16/vp16) and Q8 (kp8/vp8) rows widened as they are loaded. */
static inline __attribute__((always_inline)) void
tile_block(scratch_t *w, int slot, int64_t r0, int64_t t0, int tn, const int D, const int RB, const int KIND)
{
    const float *const *kp = w->kp[slot], *const *vp = w->vp[slot];
    const uint16_t *const *kp16 = w->kp16[slot], *const *vp16 = w->vp16[slot];
    const int8_t *const *kp8 = w->kp8[slot], *const *vp8 = w->vp8[slot];
    const int NC = D / LANES;
    int n[4];
    const int nmax = attn_tile_counts(w, r0, RB, t0, tn, n);
    if (nmax == 0)
        return;   /* causal: these rows ended in an earlier tile */
    vf q[4][16], acc[4][16];
    for (int r = 0; r < RB; r++)
        for (int ch = 0; ch < NC; ch++)
            q[r][ch] = vload(w->qs + (r0 + r) * D + ch * LANES);
    /* Scores: per token a vector of partial dot products; vsum16 finishes 16 tokens at once. */
    for (int g0 = 0; g0 < nmax; g0 += LANES) {
        vf part[4][LANES];
        const int gn = nmax - g0 < LANES ? nmax - g0 : LANES;
        float kscale[LANES];        /* int8: the tokens' K scales, applied to the summed scores */
        for (int j = 0; j < gn; j++) {
            vf kc[16];
            if (KIND == Q8)
                kscale[j] = kvos_q8_scale(kp8[g0 + j], D);
            for (int ch = 0; ch < NC; ch++)
                kc[ch] = row_chunk(kp, kp16, kp8, g0 + j, ch, KIND);
            for (int r = 0; r < RB; r++) {
                vf d = q[r][0] * kc[0];
                for (int ch = 1; ch < NC; ch++)
                    d += q[r][ch] * kc[ch];
                part[r][j] = d;
            }
        }
        for (int j = gn; j < LANES; j++) {
            kscale[j] = 0.0f;
            for (int r = 0; r < RB; r++)
                part[r][j] = vsplat(0.0f);
        }
        for (int r = 0; r < RB; r++)
            vstore(w->s + (r0 + r) * TILE + g0, KIND == Q8 ? vsum16(part[r]) * vload(kscale) : vsum16(part[r]));
    }
    for (int r = 0; r < RB; r++) {
        float *s = w->s + (r0 + r) * TILE;
        float alpha = 1.0f;
        if (n[r])
            alpha = attn_softmax_tile(s, n[r], nmax, &w->m[r0 + r], &w->l[r0 + r]);
        else
            for (int t = 0; t < nmax; t++)
                s[t] = 0.0f;
        for (int ch = 0; ch < NC; ch++)
            acc[r][ch] = vload(w->acc + (r0 + r) * D + ch * LANES) * alpha;
    }
    /* Weighted values: acc[r] += p[r][t] * v[t] over the tile, in registers. */
    for (int t = 0; t < nmax; t++) {
        vf vc[16];
        const float vs = KIND == Q8 ? kvos_q8_scale(vp8[t], D) : 1.0f;   /* int8: folded into p */
        for (int ch = 0; ch < NC; ch++)
            vc[ch] = row_chunk(vp, vp16, vp8, t, ch, KIND);
        for (int r = 0; r < RB; r++) {
            const vf p = vsplat(KIND == Q8 ? w->s[(r0 + r) * TILE + t] * vs : w->s[(r0 + r) * TILE + t]);
            for (int ch = 0; ch < NC; ch++)
                acc[r][ch] += p * vc[ch];
        }
    }
    for (int r = 0; r < RB; r++)
        for (int ch = 0; ch < NC; ch++)
            vstore(w->acc + (r0 + r) * D + ch * LANES, acc[r][ch]);
}

/* One tile of all rows, scalar loops (any head size). */
static void tile_scalar(scratch_t *w, const float *const *kp, const float *const *vp, int64_t rows,
                        int64_t t0, int tn, const int64_t D)
{
    for (int64_t r = 0; r < rows; r++) {
        const int64_t left = w->lim[r] - t0;
        if (left <= 0)
            continue;
        const int n = (int)(left < tn ? left : tn);
        const float *KVOS_RESTRICT qs = w->qs + r * D;
        float *KVOS_RESTRICT s = w->s + r * TILE;
        float *KVOS_RESTRICT acc = w->acc + r * D;
        for (int t = 0; t < n; t++)
            s[t] = kvos_dot(qs, kp[t], (int)D);
        const float alpha = attn_softmax_tile(s, n, n, &w->m[r], &w->l[r]);
        for (int64_t d = 0; d < D; d++)
            acc[d] *= alpha;
        for (int t = 0; t < n; t++) {
            const float p = s[t];
            const float *KVOS_RESTRICT vr = vp[t];
            for (int64_t d = 0; d < D; d++)
                acc[d] += p * vr[d];
        }
    }
}

/* The task loop for one head size: D is a constant in the specialised copies, and 0
 * selects the scalar loops (any head size, over tiles widened to float32 first). KIND: the
 * cache's rows (tile_block). */
static inline __attribute__((always_inline)) void
run(const call_t *c, const task_t *task, int64_t h, scratch_t *w, const int D, const int KIND)
{
    const int RB_MAX = D == 0 ? 1 : (256 / D < 4 ? 256 / D : 4);
    const int64_t rows = task_rows(c, task);
    const int64_t n_ctx = attn_limits(c, task, w);
    attn_start_rows(c, task, h, w);
    attn_translate_ahead(c, task, h, 0, n_ctx, w, 0);
    int cur = 0;
    for (int64_t t0 = 0; t0 < n_ctx; t0 += TILE, cur ^= 1) {
        const int tn = (int)(n_ctx - t0 < TILE ? n_ctx - t0 : TILE);
        if (D) {    /* head 0 asks for the next tile of every head, page spans at a time */
            const int next = attn_translate_tile(c, task, h, t0 + TILE, n_ctx, w, cur ^ 1, 0);
            if (h == 0)
                attn_prefetch_heads(c, w, cur ^ 1, next);
        } else {
            attn_translate_ahead(c, task, h, t0 + TILE, n_ctx, w, cur ^ 1);
        }
        if (D == 0) {               /* bf16 and int8 tiles widened first, then the scalar loops */
            attn_tile_ready(c, w, cur, tn);
            tile_scalar(w, w->kp[cur], w->vp[cur], rows, t0, tn, c->head_dim);
            continue;
        }
        for (int64_t r0 = 0; r0 < rows; r0 += RB_MAX) {
            const int64_t rb = rows - r0 < RB_MAX ? rows - r0 : RB_MAX;
            if (rb >= 4) tile_block(w, cur, r0, t0, tn, D, 4, KIND);
            else if (rb == 3) tile_block(w, cur, r0, t0, tn, D, 3, KIND);
            else if (rb == 2) tile_block(w, cur, r0, t0, tn, D, 2, KIND);
            else tile_block(w, cur, r0, t0, tn, D, 1, KIND);
        }
    }
    attn_finish_rows(c, task, h, w);
}

#define RUN(D) (c->k16 ? run(c, task, h, w, D, BF16) : c->k8 ? run(c, task, h, w, D, Q8) : run(c, task, h, w, D, F32))

void attn_task_rows(const call_t *c, const task_t *task, int64_t h, scratch_t *w)
{
    switch (c->head_dim) {
    case 64: RUN(64); break;
    case 128: RUN(128); break;
    case 32: RUN(32); break;
    case 96: RUN(96); break;
    case 256: RUN(256); break;
    default: run(c, task, h, w, 0, F32);   /* 0: the scalar loops, for any head size */
    }
}
