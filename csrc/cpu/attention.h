/* attention.h: what the CPU paged-attention files share (not part of the cffi interface).
 * attention.c splits a call into tasks (sequence, block of queries, kv head) and runs
 * them in parallel; a task runs on one of two paths, both walking the context in tiles
 * of TILE tokens with an online softmax:
 *   attention_rows.c   groups of up to 11 heads: per row-block dot products, 16 tokens summed at once;
 *   attention_lanes.c  groups of 12 to 32 heads: one vector lane per row, GEMM-like;
 * (by the group, not the task: a row has the same bits however its sequence is chunked);
 *   attention_avx2.c   every task on AVX2 CPUs (no AVX-512): a rows path sized for 16 registers. */
#ifndef KVOS_ATTENTION_H
#define KVOS_ATTENTION_H
#include <stdint.h>
#include "kvos_math.h"

#define TILE 32          /* context tokens per tile: its K and V rows (<= 32 KiB at d=128) sit in L1 */
#define LANES 16         /* floats per vector register (AVX-512) */

typedef struct {
    int32_t seq, q_lo, q_hi;   /* queries q_lo..q_hi-1 of sequence seq (0-based within it) */
    int64_t cost;              /* rows x context tokens, for largest-first scheduling */
} task_t;

/* Everything about the call that is the same for all its tasks. */
typedef struct {
    float *out; int64_t out_tok_stride, out_head_stride;
    const float *q; int64_t q_tok_stride, q_head_stride;
    const float *k_cache, *v_cache;         /* float32 caches (NULL otherwise) */
    const uint16_t *k16, *v16;              /* bfloat16 caches (NULL otherwise) */
    const int8_t *k8, *v8;                  /* int8 caches, rows of codes + scale (NULL otherwise) */
    const char *k_bytes, *v_bytes;          /* whichever of the three it is, as bytes */
    int64_t elem_bytes;                     /* of one cache element: offsets times this are bytes */
    int64_t page_size, frame_stride, token_stride, head_stride;
    const int32_t *page_table; int64_t page_table_stride;
    const int32_t *query_start, *context_lens;
    int64_t group;             /* query heads per kv head */
    int64_t head_dim;
    float q_scale;             /* softmax scale * log2(e): scores come out in log2 units */
    int avx2;                  /* attention_avx2.c takes the tasks it can (attn_has_avx2, once a call) */
} call_t;

/* One thread's scratch, sized for the call's largest task (rows >= 2 * LANES always fit). */
typedef struct {
    float *qs, *acc, *s;       /* rows x head_dim, rows x head_dim, rows x TILE */
    float *m, *l;              /* per row: running max (log2 units) and sum of weights */
    int64_t *lim;              /* per row: context tokens it attends to (causal) */
    const float *kp[2][TILE], *vp[2][TILE];   /* K/V rows of the current and the next tile */
    const uint16_t *kp16[2][TILE], *vp16[2][TILE];   /* bf16 caches: the tiles' rows where they lie */
    const int8_t *kp8[2][TILE], *vp8[2][TILE];       /* int8 caches: the same */
    float *tk, *tv;            /* bf16 and int8 caches: the current tile widened, TILE x head_dim each */
} scratch_t;

/* Rows of a task: row r is query q_lo + r / group, head h * group + r % group. */
static inline int64_t task_rows(const call_t *c, const task_t *t) { return (int64_t)(t->q_hi - t->q_lo) * c->group; }

/* Set up the rows' causal limits; returns how many context tokens the last row reads. */
int64_t attn_limits(const call_t *c, const task_t *task, scratch_t *w);
/* Address translation of tokens t0..t0+tn-1 of head h through a page-table row: the element
 * offset of each token's row in the cache. */
void attn_translate(const call_t *c, const int32_t *page_row, int64_t h, int64_t t0, int tn,
                    int64_t *offsets);
/* Translate tile t0 into buffer `slot` and prefetch its rows (pages are scattered, so
 * the hardware prefetcher cannot guess them); no-op past the end of the context. */
void attn_translate_ahead(const call_t *c, const task_t *task, int64_t h, int64_t t0, int64_t n_ctx,
                          scratch_t *w, int slot);
/* The same without the prefetches when prefetch is 0 (the caller spreads them over the tile before);
 * returns the tile's token count (0 past the end of the context). */
int attn_translate_tile(const call_t *c, const task_t *task, int64_t h, int64_t t0, int64_t n_ctx,
                        scratch_t *w, int slot, int prefetch);
/* Tile `slot`'s K and V lines of every KV head asked for into L2, a page span at a time (its tn
 * rows translated); head 0's pass calls it a tile ahead (the rows path: every cache; AVX2: int8). */
void attn_prefetch_heads(const call_t *c, const scratch_t *w, int slot, int tn);
/* Make tile `slot` (tn rows) readable as float32 through w->kp/vp[slot]: a no-op for float32
 * caches; bf16 and int8 rows are widened into w->tk/tv, so the loads from memory are a half or
 * about a quarter of the bytes. */
void attn_tile_ready(const call_t *c, scratch_t *w, int slot, int tn);
/* Address of row r's query (or output) vector. */
const float *attn_q_row(const call_t *c, const task_t *task, int64_t h, int64_t r);
float *attn_out_row(const call_t *c, const task_t *task, int64_t h, int64_t r);

/* Load the task's rows' scaled queries and clear their softmax state; write the outputs at the end. */
void attn_start_rows(const call_t *c, const task_t *task, int64_t h, scratch_t *w);
void attn_finish_rows(const call_t *c, const task_t *task, int64_t h, scratch_t *w);

/* Softmax step of one row over its n valid scores s[0..n) of a tile of width tn: the
 * weights replace the scores (0 past n); returns the factor that rescales the accumulator. */
static inline __attribute__((always_inline)) float attn_softmax_tile(float *KVOS_RESTRICT s, int n, int tn,
                                                                     float *m, float *l)
{
    float block_max = KVOS_NEG_BIG;
    KVOS_SIMD_MAX(block_max)
    for (int t = 0; t < n; t++)
        block_max = s[t] > block_max ? s[t] : block_max;
    const float alpha = kvos_softmax_rescale(m, block_max);
    const float mx = *m;
    float sum = 0.0f;
    KVOS_SIMD_SUM(sum)
    for (int t = 0; t < tn; t++) {
        float p = t < n ? kvos_exp2(s[t] - mx) : 0.0f;
        s[t] = p;
        sum += p;
    }
    *l = *l * alpha + sum;
    return alpha;
}

/* Rows r0..r0+R-1 against the tile of tn tokens at t0: n[r] = the tokens each attends to there
 * (causal); returns their largest, 0 when all these rows ended in an earlier tile. */
static inline __attribute__((always_inline)) int attn_tile_counts(const scratch_t *w, int64_t r0, int R, int64_t t0,
                                                                  int tn, int *n)
{
    int nmax = 0;
    for (int r = 0; r < R; r++) {
        const int64_t left = w->lim[r0 + r] - t0;
        n[r] = left <= 0 ? 0 : (left < tn ? (int)left : tn);
        nmax = n[r] > nmax ? n[r] : nmax;
    }
    return nmax;
}

void attn_task_rows(const call_t *c, const task_t *task, int64_t h, scratch_t *w);
/* Any task on AVX2 CPUs (attention_avx2.c): head sizes 64 and 128; returns 0 where it cannot run. */
int attn_task_rows_avx2(const call_t *c, const task_t *task, int64_t h, scratch_t *w);
int attn_has_avx2(void);
void attn_task_lanes(const call_t *c, const task_t *task, int64_t h, scratch_t *w);

#endif
