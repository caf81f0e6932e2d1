/* The lanes path of CPU paged attention: for groups of 12 to 32 query heads per kv head, whose
 * decode tasks alone fill 12 or more lanes (prefill tasks hold up to 32 / group queries). Row r lives in lane r % 16 of row vector r / 16, so a tile
 * is two small GEMMs with no horizontal sums: scores S[t] = sum_d qT[d] * k[t][d] and
 * outputs oT[d] += P[t] * v[t][d], each FMA taking one broadcast K or V element for NV
 * row vectors; the causal mask and the online softmax run across lanes. q and the
 * output are kept transposed (head_dim x 16 NV) for the whole task. */
#include "kvos_cpu.h"
#include "attention.h"
#include "simd.h"

#define TOKENS_PER_STEP 8   /* tokens whose scores are in flight: hides the FMA latency */
#define DIMS_PER_STEP 8     /* output dimensions in registers per pass over a tile (NV = 2) */

/* S[t] for the tile's tokens, t < tn rounded up to a step (steps past tn repeat the last
 * token, so every address read is a real one; their scores are masked later). */
static inline __attribute__((always_inline)) void
tile_scores(const float *KVOS_RESTRICT qT, const float *const *kp, int tn, int64_t D, float *KVOS_RESTRICT S,
            const int NV)
{
    const int W = NV * LANES;
    for (int tb = 0; tb < tn; tb += TOKENS_PER_STEP) {
        const float *k[TOKENS_PER_STEP];
        vf a[TOKENS_PER_STEP][2];
        for (int j = 0; j < TOKENS_PER_STEP; j++) {
            k[j] = kp[tb + j < tn ? tb + j : tn - 1];
            for (int v = 0; v < NV; v++)
                a[j][v] = vsplat(0.0f);
        }
        for (int64_t d = 0; d < D; d++) {
            vf qd[2];
            for (int v = 0; v < NV; v++)
                qd[v] = vload(qT + d * W + v * LANES);
            for (int j = 0; j < TOKENS_PER_STEP; j++) {
                const vf kd = vsplat(k[j][d]);
                for (int v = 0; v < NV; v++)
                    a[j][v] += qd[v] * kd;
            }
        }
        for (int j = 0; j < TOKENS_PER_STEP; j++)
            for (int v = 0; v < NV; v++)
                vstore(S + (tb + j) * W + v * LANES, a[j][v]);
    }
}

/* Online softmax across lanes: mask the causal future, fold the tile into (m, l) and
 * turn S into weights P; leaves the accumulator's rescale factors in alpha. */
static inline __attribute__((always_inline)) void
tile_softmax(float *KVOS_RESTRICT S, int tn, int64_t t0, const int32_t *lim, float *m, float *l,
             float *KVOS_RESTRICT alpha, const int NV)
{
    const int W = NV * LANES;
    for (int v = 0; v < NV; v++) {
        const vi limv = vload_i(lim + v * LANES);
        vf mx = vload(m + v * LANES);
        for (int t = 0; t < tn; t++)
            mx = vmax(mx, vselect(visplat((int32_t)(t0 + t)) < limv, vload(S + t * W + v * LANES),
                                  vsplat(KVOS_NEG_BIG)));
        for (int r = 0; r < LANES; r++)
            alpha[v * LANES + r] = kvos_softmax_rescale(&m[v * LANES + r], mx[r]);
        const vf mv = vload(m + v * LANES);
        vf sum = vsplat(0.0f);
        for (int t = 0; t < tn; t++) {
            vf p = vselect(visplat((int32_t)(t0 + t)) < limv, vexp2(vload(S + t * W + v * LANES) - mv),
                           vsplat(0.0f));
            vstore(S + t * W + v * LANES, p);
            sum += p;
        }
        vstore(l + v * LANES, vload(l + v * LANES) * vload(alpha + v * LANES) + sum);
    }
}

/* oT[d] = oT[d] * alpha + sum_t P[t] * v[t][d], a block of d's at a time in registers. */
static inline __attribute__((always_inline)) void
tile_values(float *KVOS_RESTRICT oT, const float *KVOS_RESTRICT P, const float *const *vp, int tn, int64_t D,
            const float *alpha, const int NV)
{
    const int W = NV * LANES, DB = NV == 1 ? LANES : DIMS_PER_STEP;   /* 16 accumulators either way */
    vf a[2];
    for (int v = 0; v < NV; v++)
        a[v] = vload(alpha + v * LANES);
    for (int64_t d0 = 0; d0 < D; d0 += DB) {
        vf o[LANES][2];
        for (int i = 0; i < DB; i++)
            for (int v = 0; v < NV; v++)
                o[i][v] = vload(oT + (d0 + i) * W + v * LANES) * a[v];
        for (int t = 0; t < tn; t++) {
            vf p[2];
            for (int v = 0; v < NV; v++)
                p[v] = vload(P + t * W + v * LANES);
            const float *vr = vp[t] + d0;
            for (int i = 0; i < DB; i++) {
                const vf x = vsplat(vr[i]);
                for (int v = 0; v < NV; v++)
                    o[i][v] += p[v] * x;
            }
        }
        for (int i = 0; i < DB; i++)
            for (int v = 0; v < NV; v++)
                vstore(oT + (d0 + i) * W + v * LANES, o[i][v]);
    }
}

static inline __attribute__((always_inline)) void
run(const call_t *c, const task_t *task, int64_t h, scratch_t *w, const int NV)
{
    const int W = NV * LANES;
    const int64_t D = c->head_dim, rows = task_rows(c, task);
    float *qT = w->qs, *oT = w->acc, *S = w->s;
    float alpha[2 * LANES];
    int32_t lim[2 * LANES];
    const int64_t n_ctx = attn_limits(c, task, w);
    for (int r = 0; r < W; r++) {
        const float *qr = r < rows ? attn_q_row(c, task, h, r) : NULL;
        for (int64_t d = 0; d < D; d++) {
            qT[d * W + r] = qr ? qr[d] * c->q_scale : 0.0f;
            oT[d * W + r] = 0.0f;
        }
        lim[r] = r < rows ? (int32_t)w->lim[r] : 0;   /* empty lanes attend to nothing */
        w->m[r] = KVOS_NEG_BIG;
        w->l[r] = 0.0f;
    }
    attn_translate_ahead(c, task, h, 0, n_ctx, w, 0);
    int cur = 0;
    for (int64_t t0 = 0; t0 < n_ctx; t0 += TILE, cur ^= 1) {
        const int tn = (int)(n_ctx - t0 < TILE ? n_ctx - t0 : TILE);
        attn_translate_ahead(c, task, h, t0 + TILE, n_ctx, w, cur ^ 1);
        attn_tile_ready(c, w, cur, tn);
        tile_scores(qT, w->kp[cur], tn, D, S, NV);
        tile_softmax(S, tn, t0, lim, w->m, w->l, alpha, NV);
        tile_values(oT, S, w->vp[cur], tn, D, alpha, NV);
    }
    for (int64_t r = 0; r < rows; r++) {
        float *o = attn_out_row(c, task, h, r);
        const float inv = 1.0f / w->l[r];
        for (int64_t d = 0; d < D; d++)
            o[d] = oT[d * W + r] * inv;
    }
}

void attn_task_lanes(const call_t *c, const task_t *task, int64_t h, scratch_t *w)
{
    if (task_rows(c, task) > LANES)
        run(c, task, h, w, 2);
    else
        run(c, task, h, w, 1);
}
