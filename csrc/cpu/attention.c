/* Paged attention on the CPU: causal attention of a packed ragged batch over K/V reached
 * through page tables, for decode (q_len 1) and chunked prefill (q_len > 1) alike.
 * The call is split into tasks (sequence, block of its queries, kv head): a task holds
 * the whole GQA group of query heads of its kv head, so each K/V row is read once for
 * all of them. Tasks run in parallel (OpenMP, largest first); attention.h says how a
 * task walks its context. This file: checks, tasks, address translation, the loop. */
#include <stdlib.h>
#include <omp.h>
#include "kvos_cpu.h"
#include "attention.h"
#include "bf16.h"
#include "q8.h"
#include "kvrow.h"

static int check_batch(const int32_t *page_table, int64_t page_table_stride, int64_t max_pages,
                       int64_t num_frames, int64_t page_size, const int32_t *query_start,
                       const int32_t *context_lens, int64_t num_seqs, int64_t num_tokens, int64_t *bad)
{
    if (query_start[0] != 0)
        return KVOS_E_QSTART0;
    for (int64_t s = 0; s < num_seqs; s++)
        if (query_start[s + 1] < query_start[s]) { bad[0] = s; return KVOS_E_QSTART_ORDER; }
    if (query_start[num_seqs] != num_tokens)
        return KVOS_E_QSTART_END;
    for (int64_t s = 0; s < num_seqs; s++) {
        int64_t q_len = query_start[s + 1] - query_start[s];
        if (context_lens[s] < q_len) { bad[0] = s; return KVOS_E_CONTEXT; }
        if (q_len == 0)
            continue;   /* a sequence without queries reads nothing */
        int64_t pages = (context_lens[s] + page_size - 1) / page_size;
        if (pages > max_pages) { bad[0] = s; return KVOS_E_PAGES; }
        const int32_t *row = page_table + s * page_table_stride;
        for (int64_t p = 0; p < pages; p++)
            if (row[p] < 0 || row[p] >= num_frames) { bad[0] = s; bad[1] = p; return KVOS_E_PAGE_ENTRY; }
    }
    return KVOS_OK;
}

static int by_cost_desc(const void *a, const void *b)
{
    int64_t ca = ((const task_t *)a)->cost, cb = ((const task_t *)b)->cost;
    return (ca < cb) - (ca > cb);
}

/* ---- helpers shared by both task paths (declared in attention.h) ---- */

int64_t attn_limits(const call_t *c, const task_t *task, scratch_t *w)
{
    const int64_t seq = task->seq, G = c->group;
    const int64_t q_len = c->query_start[seq + 1] - c->query_start[seq];
    const int64_t ctx = c->context_lens[seq];
    for (int64_t r = 0; r < task_rows(c, task); r++)
        w->lim[r] = kvos_query_pos(ctx, q_len, task->q_lo + r / G) + 1;   /* positions 0..pos */
    return kvos_query_pos(ctx, q_len, task->q_hi - 1) + 1;
}

const float *attn_q_row(const call_t *c, const task_t *task, int64_t h, int64_t r)
{
    int64_t token = c->query_start[task->seq] + task->q_lo + r / c->group, head = h * c->group + r % c->group;
    return c->q + token * c->q_tok_stride + head * c->q_head_stride;
}

float *attn_out_row(const call_t *c, const task_t *task, int64_t h, int64_t r)
{
    int64_t token = c->query_start[task->seq] + task->q_lo + r / c->group, head = h * c->group + r % c->group;
    return c->out + token * c->out_tok_stride + head * c->out_head_stride;
}

void attn_translate(const call_t *c, const int32_t *page_row, int64_t h, int64_t t0, int tn,
                    int64_t *offsets)
{
    const int64_t head_off = h * c->head_stride;
    int64_t page = t0 / c->page_size, off = t0 % c->page_size;
    int64_t base = kvos_context_offset(page_row, t0, c->page_size, c->frame_stride, c->token_stride) + head_off;
    for (int t = 0; t < tn; t++) {
        offsets[t] = base;
        if (++off == c->page_size) {   /* one page-table lookup per page crossed */
            off = 0;
            if (t + 1 < tn)
                base = kvos_context_offset(page_row, (++page) * c->page_size, c->page_size,
                                           c->frame_stride, c->token_stride) + head_off;
        } else {
            base += c->token_stride;
        }
    }
}

void attn_translate_ahead(const call_t *c, const task_t *task, int64_t h, int64_t t0, int64_t n_ctx,
                          scratch_t *w, int slot)
{
    attn_translate_tile(c, task, h, t0, n_ctx, w, slot, 1);
}

int attn_translate_tile(const call_t *c, const task_t *task, int64_t h, int64_t t0, int64_t n_ctx,
                        scratch_t *w, int slot, int prefetch)
{
    if (t0 >= n_ctx)
        return 0;
    const int tn = (int)(n_ctx - t0 < TILE ? n_ctx - t0 : TILE);
    int64_t offsets[TILE];
    attn_translate(c, c->page_table + task->seq * c->page_table_stride, h, t0, tn, offsets);
    const int64_t row_bytes = c->head_dim * c->elem_bytes + (c->k8 ? KVOS_Q8_SCALE_BYTES : 0);
    for (int t = 0; t < tn; t++) {
        if (c->k16) {
            w->kp16[slot][t] = c->k16 + offsets[t];
            w->vp16[slot][t] = c->v16 + offsets[t];
        } else if (c->k8) {
            w->kp8[slot][t] = c->k8 + offsets[t];
            w->vp8[slot][t] = c->v8 + offsets[t];
        } else {
            w->kp[slot][t] = c->k_cache + offsets[t];
            w->vp[slot][t] = c->v_cache + offsets[t];
        }
        /* one prefetch per cache line; an int8 row's scale may sit in the line after its codes */
        for (int64_t b = 0; prefetch && b < row_bytes; b += 64) {
            __builtin_prefetch(c->k_bytes + offsets[t] * c->elem_bytes + b);
            __builtin_prefetch(c->v_bytes + offsets[t] * c->elem_bytes + b);
        }
    }
    return tn;
}

/* A token's rows of all heads are contiguous within a page ([token][kv_head]; an int8 row is 68
 * bytes at d = 64), so a run of tokens on one page is one span of token_stride elements a token:
 * one prefetch a line (into L2: locality 2, _MM_HINT_T1) for every head. Called by head 0's pass a
 * tile ahead: head 0 finds its rows on their way, and the task's other heads, run next on this
 * thread (or at the same time on another), find theirs nearer. Measured (docs/performance.md
 * sections 14 and 20): on the AVX2 path, int8 caches 6-13% less attention time from 8 decode rows
 * in a kv8 `mixed` run, float32 ones 3-12% slower (they prefetch row by row there); on the AVX-512
 * rows path 5-10% faster for float32 and bf16 caches too, so that path uses it for every cache. */
/* Where row t of tile `slot` starts, as bytes: K (v = 0) or V (v = 1), whichever the cache holds. */
static inline const char *tile_row_bytes(const call_t *c, const scratch_t *w, int slot, int t, int v)
{
    if (c->k8)
        return (const char *)(v ? w->vp8[slot][t] : w->kp8[slot][t]);
    if (c->k16)
        return (const char *)(v ? w->vp16[slot][t] : w->kp16[slot][t]);
    return (const char *)(v ? w->vp[slot][t] : w->kp[slot][t]);
}

void attn_prefetch_heads(const call_t *c, const scratch_t *w, int slot, int tn)
{
    const int64_t tok = c->token_stride * c->elem_bytes;
    for (int t = 0, t1; t < tn; t = t1) {
        const char *k = tile_row_bytes(c, w, slot, t, 0), *v = tile_row_bytes(c, w, slot, t, 1);
        for (t1 = t + 1; t1 < tn && tile_row_bytes(c, w, slot, t1, 0) == k + (t1 - t) * tok; t1++)
            ;
        for (int64_t b = 0; b < (t1 - t) * tok; b += 64) {
            __builtin_prefetch(k + b, 0, 2);
            __builtin_prefetch(v + b, 0, 2);
        }
    }
}

/* Load the task's scaled query rows and clear their softmax state. */
void attn_start_rows(const call_t *c, const task_t *task, int64_t h, scratch_t *w)
{
    const int64_t D = c->head_dim;
    for (int64_t r = 0; r < task_rows(c, task); r++) {
        const float *qr = attn_q_row(c, task, h, r);
        for (int64_t d = 0; d < D; d++) {
            w->qs[r * D + d] = qr[d] * c->q_scale;
            w->acc[r * D + d] = 0.0f;
        }
        w->m[r] = KVOS_NEG_BIG;
        w->l[r] = 0.0f;
    }
}

void attn_finish_rows(const call_t *c, const task_t *task, int64_t h, scratch_t *w)
{
    const int64_t D = c->head_dim;
    for (int64_t r = 0; r < task_rows(c, task); r++) {
        float *o = attn_out_row(c, task, h, r);
        const float inv = 1.0f / w->l[r];
        for (int64_t d = 0; d < D; d++)
            o[d] = w->acc[r * D + d] * inv;
    }
}

void attn_tile_ready(const call_t *c, scratch_t *w, int slot, int tn)
{
    if (!c->k16 && !c->k8)
        return;
    const int64_t D = c->head_dim;
    for (int t = 0; t < tn; t++) {
        if (c->k8) {
            kvos_widen_q8(w->tk + t * D, w->kp8[slot][t], D);
            kvos_widen_q8(w->tv + t * D, w->vp8[slot][t], D);
        } else {
            kvos_widen_bf16(w->tk + t * D, w->kp16[slot][t], D);
            kvos_widen_bf16(w->tv + t * D, w->vp16[slot][t], D);
        }
        w->kp[slot][t] = w->tk + t * D;
        w->vp[slot][t] = w->tv + t * D;
    }
}

/* Heads a group from which its tasks take the lanes path: with fewer, too many lanes sit empty
 * at decode and the rows path is faster (measured: 8 rows of d=128, 18 against 28 cycles per
 * row-token). */
#define LANES_MIN_GROUP 12
/* Row-tokens from which a call wakes the other threads: both paths take ~10-25 ns a row-token at
 * decode (measured: one sequence, 9 heads over 3, d = 64), so calls pay off from ~2K (ctx 300: 41 ->
 * 29 us on 2 threads, AVX2). The AVX-512 paths had 32K, set when they were thought a few times
 * faster: 2 to 4 sequences of 200-600 tokens then ran on one thread, 1.5-1.9x slower a step
 * (benchmarks/bench_attention_decode.py, docs/performance.md section 20). */
#define PARALLEL_MIN_WORK (1 << 11)

/* The path is chosen by the group alone (query heads per kv head, and the head size), never by
 * how many of a sequence's queries a task holds: the two paths sum in different orders, and a
 * row must have the same bits however its sequence was chunked (a prefix mapped from the page
 * cache, a prefill chunk boundary) and whether it was decoded or verified as a speculative draft
 * (kernel/speculate.py). With a group of 12 to 32 heads even a decode task fills the lanes. */
static void run_task(const call_t *c, const task_t *task, int64_t h, scratch_t *w)
{
    if (c->avx2 && attn_task_rows_avx2(c, task, h, w))
        return;
    if (c->group >= LANES_MIN_GROUP && c->group <= 2 * LANES && c->head_dim % LANES == 0)
        attn_task_lanes(c, task, h, w);
    else
        attn_task_rows(c, task, h, w);
}

int kvos_paged_attention(float *out, int64_t out_tok_stride, int64_t out_head_stride,
                         const float *q, int64_t q_tok_stride, int64_t q_head_stride,
                         const void *k_cache, const void *v_cache, int cache_kind,
                         int64_t num_frames, int64_t page_size,
                         int64_t frame_stride, int64_t token_stride, int64_t head_stride,
                         const int32_t *page_table, int64_t page_table_stride, int64_t max_pages,
                         const int32_t *query_start, const int32_t *context_lens,
                         int64_t num_seqs, int64_t num_tokens, int64_t num_heads, int64_t kv_heads,
                         int64_t head_dim, float scale, int check, int64_t *bad)
{
    if (check) {
        int rc = check_batch(page_table, page_table_stride, max_pages, num_frames, page_size,
                             query_start, context_lens, num_seqs, num_tokens, bad);
        if (rc != KVOS_OK)
            return rc;
    }
    const int64_t G = num_heads / kv_heads;
    /* Queries per task in a prefill chunk: enough to fill two vectors' lanes with rows. */
    const int64_t q_block = G >= 2 * LANES ? 1 : 2 * LANES / G;

    int64_t num_tasks = 0;
    for (int64_t s = 0; s < num_seqs; s++)
        num_tasks += (query_start[s + 1] - query_start[s] + q_block - 1) / q_block;
    if (num_tasks == 0)
        return KVOS_OK;
    task_t *tasks = malloc((size_t)num_tasks * sizeof(task_t));
    if (!tasks)
        return KVOS_E_NOMEM;
    int64_t n = 0;
    for (int64_t s = 0; s < num_seqs; s++) {
        int64_t q_len = query_start[s + 1] - query_start[s];
        for (int64_t lo = 0; lo < q_len; lo += q_block) {
            int64_t hi = lo + q_block < q_len ? lo + q_block : q_len;
            tasks[n++] = (task_t){(int32_t)s, (int32_t)lo, (int32_t)hi,
                                  (hi - lo) * kvos_query_pos(context_lens[s], q_len, hi - 1)};
        }
    }
    qsort(tasks, (size_t)num_tasks, sizeof(task_t), by_cost_desc);
    int64_t work = 0;   /* row-tokens, a few ns each */
    for (int64_t j = 0; j < num_tasks; j++)
        work += tasks[j].cost * num_heads;

    const int f32 = cache_kind == KVOS_CACHE_F32, bf16 = cache_kind == KVOS_CACHE_BF16,
              q8 = cache_kind == KVOS_CACHE_Q8;
    const call_t call = {out, out_tok_stride, out_head_stride, q, q_tok_stride, q_head_stride,
                         f32 ? (const float *)k_cache : NULL, f32 ? (const float *)v_cache : NULL,
                         bf16 ? (const uint16_t *)k_cache : NULL, bf16 ? (const uint16_t *)v_cache : NULL,
                         q8 ? (const int8_t *)k_cache : NULL, q8 ? (const int8_t *)v_cache : NULL,
                         (const char *)k_cache, (const char *)v_cache, kvos_cache_elem_bytes(cache_kind),
                         page_size, frame_stride, token_stride, head_stride,
                         page_table, page_table_stride, query_start, context_lens,
                         G, head_dim, scale * KVOS_LOG2E, attn_has_avx2()};
    const int64_t rows = (q_block * G > 2 * LANES ? q_block * G : 2 * LANES), D = head_dim;
    int failed = 0;
    /* With enough tasks, one thread takes all of a task's KV heads in a row (one dynamic chunk of
     * kv_heads iterations): their rows lie interleaved in the same cache lines ([token][kv_head]
     * within a page), which the first head brings into this core's caches for the others (about a
     * fifth less attention time at 8-31 decode rows, docs/performance.md section 14). With few, a
     * chunk is one head, so a task's heads spread over the threads. */
    const int threads = kvos_num_threads();
    const int chunk = num_tasks >= 2 * threads ? (int)kv_heads : 1;
    /* Waking the other threads costs tens of microseconds (far more on a busy machine):
     * calls with less work than that run on the calling thread alone. */
    #pragma omp parallel num_threads(threads) \
        if (work > PARALLEL_MIN_WORK)
    {
        scratch_t w;
        const int64_t tile_floats = f32 ? 0 : 2 * TILE * D;   /* the widened tile */
        float *buf = malloc((size_t)(rows * (2 * D + TILE + 2) + tile_floats) * sizeof(float));
        int64_t *lim = malloc((size_t)rows * sizeof(int64_t));
        if (buf && lim) {
            w.qs = buf;
            w.acc = w.qs + rows * D;
            w.s = w.acc + rows * D;
            w.m = w.s + rows * TILE;
            w.l = w.m + rows;
            w.tk = w.l + rows;
            w.tv = w.tk + TILE * D;
            w.lim = lim;
        } else {
            #pragma omp atomic write
            failed = 1;
        }
        /* Every thread reaches the loop (an OpenMP rule); one without scratch does no work. */
        #pragma omp for schedule(dynamic, chunk)
        for (int64_t j = 0; j < num_tasks * kv_heads; j++)
            if (buf && lim)
                run_task(&call, &tasks[j / kv_heads], j % kv_heads, &w);
        free(buf);
        free(lim);
    }
    free(tasks);
    return failed ? KVOS_E_NOMEM : KVOS_OK;
}
