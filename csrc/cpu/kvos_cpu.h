/* kvos CPU kernels: the C entry points that kernel/ops/cpu.py calls through cffi.
 * Everything between the cdef markers is parsed by cffi, so it must stay plain
 * declarations. Index arrays are int32; memory is passed as raw pointers plus
 * element strides so one frame pool can serve models of different shapes.
 * Functions that take `check` validate every index they will follow before any
 * write and return a KVOS_E* code (0 = done) with the culprit in bad[0..1]. */
#ifndef KVOS_CPU_H
#define KVOS_CPU_H
#include <stdint.h>
#include <stddef.h>

/* cdef-begin */
/* Return codes of the checked entry points; kernel/ops/cpu.py turns them into KvosError. */
enum {
    KVOS_OK = 0,
    KVOS_E_SLOT = 1,          /* bad[0] = token, bad[1] = its slot outside the pool */
    KVOS_E_QSTART0 = 2,       /* query_start[0] != 0 */
    KVOS_E_QSTART_ORDER = 3,  /* bad[0] = s: query_start[s+1] < query_start[s] */
    KVOS_E_QSTART_END = 4,    /* query_start[num_seqs] != num_tokens */
    KVOS_E_CONTEXT = 5,       /* bad[0] = s: context_lens[s] < q_len of s */
    KVOS_E_PAGES = 6,         /* bad[0] = s: context needs more pages than a page-table row holds */
    KVOS_E_PAGE_ENTRY = 7,    /* bad[0] = s, bad[1] = page: entry is not a frame of the pool */
    KVOS_E_INDEX = 8,         /* bad[0] = i, bad[1] = which list (0 src, 1 dst): frame or slot out of range */
    KVOS_E_DUPLICATE = 9,     /* bad[0] = i: dst[i] repeats an earlier destination */
    KVOS_E_OVERLAP = 10,      /* bad[0] = i: dst[i] is also a source (same pool) */
    KVOS_E_NOMEM = 11,        /* scratch allocation failed */
    KVOS_E_POSITION = 12,     /* bad[0] = token, bad[1] = its position outside the RoPE tables */
    KVOS_E_KIND = 13          /* a kvos_linear of no known kind (kernel/ops/step_ops.py makes only these) */
};
/* What a K/V cache holds (the cache_kind argument): float32; bfloat16 (rounded to nearest even, as
 * torch rounds); or int8 rows of head_dim codes, each followed by its float32 scale (q8.h), so the
 * head stride is at least head_dim + 4 bytes. Strides are in elements of the kind (bytes for Q8). */
enum { KVOS_CACHE_F32 = 0, KVOS_CACHE_BF16 = 1, KVOS_CACHE_Q8 = 2 };

/* Copy whole frames: dst_pool[dst[i]] = src_pool[src[i]], frame_bytes each.
 * Serves copy-on-write (same pool) and swap (pool <-> host swap area). Unchecked. */
void kvos_copy_frames(const uint8_t *src_pool, uint8_t *dst_pool, int64_t frame_bytes,
                      const int32_t *src, const int32_t *dst, int64_t n);
/* The same copy, after checking that src < src_count, dst < dst_count, dst has no
 * repeats and (when same_pool) no dst is also a src, so the parallel copy is order-free. */
int kvos_copy_frames_checked(const uint8_t *src_pool, uint8_t *dst_pool, int64_t frame_bytes,
                             const int32_t *src, int64_t src_count, const int32_t *dst, int64_t dst_count,
                             int64_t n, int same_pool, int check, int64_t *bad);

/* write_kv: cache[slot[t]] = new[t] for keys and values. k and v are float32
 * (num_tokens, kv_heads, head_dim) with strides (tok, head, 1); the caches are views
 * (num_frames, page_size, kv_heads, head_dim) with element strides (frame, token, head, 1),
 * holding cache_kind (KVOS_CACHE_*). */
int kvos_write_kv(void *k_cache, void *v_cache, int cache_kind, int64_t num_frames, int64_t page_size,
                  int64_t frame_stride, int64_t token_stride, int64_t head_stride,
                  const float *k, const float *v, int64_t k_tok_stride, int64_t k_head_stride,
                  int64_t v_tok_stride, int64_t v_head_stride,
                  const int32_t *slot_mapping, int64_t num_tokens, int64_t kv_heads, int64_t head_dim,
                  int check, int64_t *bad);

/* paged_attention: causal attention of the packed float32 queries q over the context
 * reached through page_table; see kernel/ops/reference.py for the contract. The caches
 * hold cache_kind; bfloat16 and int8 tiles are widened to float32 as they are used. */
int kvos_paged_attention(float *out, int64_t out_tok_stride, int64_t out_head_stride,
                         const float *q, int64_t q_tok_stride, int64_t q_head_stride,
                         const void *k_cache, const void *v_cache, int cache_kind,
                         int64_t num_frames, int64_t page_size,
                         int64_t frame_stride, int64_t token_stride, int64_t head_stride,
                         const int32_t *page_table, int64_t page_table_stride, int64_t max_pages,
                         const int32_t *query_start, const int32_t *context_lens,
                         int64_t num_seqs, int64_t num_tokens, int64_t num_heads, int64_t kv_heads,
                         int64_t head_dim, float scale, int check, int64_t *bad);

/* panel_mm (panel_mm.c): y = x @ W^T in float32, W packed in panels of kvos_panel_width() columns
 * (kernel/ops/panel.py packs it); y = (accumulate ? y : 0) + x @ W^T + (bias or 0). Rows of x
 * and y at element strides; unchecked (kernel/ops/dispatch.py checks). */
void kvos_panel_mm(float *y, int64_t y_stride, const float *x, int64_t x_stride, const float *packed,
                   const float *bias, int64_t m, int64_t k, int64_t n, int accumulate);
int kvos_panel_width(void);
/* The same on narrow panels of kvos_panel_narrow_width() columns (panel_pack(w, width=16): a W of few
 * rows, a LoRA adapter's A), each output the same bits as on the wide panels. */
void kvos_panel_mm_narrow(float *y, int64_t y_stride, const float *x, int64_t x_stride, const float *packed,
                          const float *bias, int64_t m, int64_t k, int64_t n, int accumulate);
int kvos_panel_narrow_width(void);
/* kvos_panel_mm (no bias) on wide panels where panel p's rows of W^T are zero outside k in
 * [kranges[2p], kranges[2p + 1]): only those rows are read (a LoRA delta's B, block-diagonal over
 * the slot's pieces). Skipped zeros add nothing to a finite sum: kvos_panel_mm's bits. */
void kvos_panel_mm_kranges(float *y, int64_t y_stride, const float *x, int64_t x_stride, const float *packed,
                           const int32_t *kranges, int64_t m, int64_t k, int64_t n, int accumulate);
/* panel_mm_bf16 (panel_bf16.c): y = (accumulate ? y : 0) + bf16(x) @ W^T + (bias or 0), float32 sums,
 * W packed in bf16 panels of k-pairs by kernel/ops/panel.py; x float32 (rounded inside, nearest even)
 * or bfloat16 when x_bf16. path: 0 the best this CPU has, 1 plain C, 2 vdpbf16ps (callers check
 * kvos_panel_bf16_has_dp first). Returns KVOS_E_NOMEM or 0; otherwise unchecked (panel.py checks). */
int kvos_panel_mm_bf16(float *y, int64_t y_stride, const void *x, int x_bf16, int64_t x_stride,
                       const uint16_t *packed, const float *bias, int64_t m, int64_t k, int64_t n, int accumulate,
                       int path);
int kvos_panel_bf16_has_dp(void);
/* qmm (qmm.c): y (m, n) float32 = x (m, k) float32 @ W^T, W packed by kernel/ops/qblocks.py in 4- or
 * 8-bit blocks of 32 (w = d*u + m); x is quantized to int8 per 32-block inside. path: 0 the
 * best this CPU has (AMX from 32 rows, 16 at 8 bits, where the CPU has it, else VNNI), 1 portable C, 2 VNNI,
 * 3 AVX2, 4 AMX (callers check kvos_qmm_has_vnni / _avx2 / _amx first). */
int kvos_qmm(float *y, int64_t y_stride, const float *x, int64_t x_stride, int64_t m, int64_t k,
             const uint8_t *w, int64_t n, int bits, int path);
int kvos_qmm_has_vnni(void);
int kvos_qmm_has_avx2(void);
int kvos_qmm_has_amx(void);
int64_t kvos_qmm_record_bytes(int bits);
/* Rows ids[0..nids) of W (n, k) as float32 d * u + m into out (nids, k), read from qmm's packed records
 * (a tied embedding's lookup on its head's blocks). ids checked by the caller (0 <= id < n). */
void kvos_qmm_rows(float *out, const uint8_t *w, int64_t n, int64_t k, int bits, const int64_t *ids, int64_t nids);

/* fused.c: the fused layer ops in float32 (kernel/ops/fused.py checks their arguments). Rows at element
 * strides, last dimension dense. add_rms_norm: residual += delta, out = RMSNorm(residual) * weight (out may
 * be residual). rms_norm: out = RMSNorm(x) * weight. rope_write_kv: RoPE of q in place and of k into
 * its cache slot with v (k unchanged), positions and slots checked first when check. silu_mul:
 * out = SiLU(gate) * up of gate_up rows (gate first, inter wide each). */
void kvos_add_rms_norm(float *residual, int64_t res_stride, const float *delta, int64_t delta_stride,
                       const float *weight, float *out, int64_t out_stride, int64_t rows, int64_t n, float eps);
void kvos_rms_norm(const float *x, int64_t x_stride, const float *weight, float *out, int64_t out_stride,
                   int64_t rows, int64_t n, float eps);
int kvos_rope_write_kv(float *q, int64_t q_tok_stride, int64_t q_head_stride, int64_t num_heads,
                       const float *k, int64_t k_tok_stride, int64_t k_head_stride,
                       const float *v, int64_t v_tok_stride, int64_t v_head_stride,
                       const float *cos, int64_t cos_stride, const float *sin, int64_t sin_stride,
                       const int32_t *positions, int64_t num_positions,
                       void *k_cache, void *v_cache, int cache_kind, int64_t num_frames, int64_t page_size,
                       int64_t frame_stride, int64_t token_stride, int64_t head_stride,
                       const int32_t *slot_mapping, int64_t num_tokens, int64_t kv_heads, int64_t head_dim,
                       int check, int64_t *bad);
void kvos_silu_mul(const float *gate_up, int64_t gu_stride, float *out, int64_t out_stride, int64_t rows, int64_t inter);

/* layers.c: the decoder layers of one forward step in one call (kernel/ops/step_ops.py checks
 * everything but the indices, which layer 0 checks when check). A GEMM's weights: */
enum { KVOS_LINEAR_PANEL = 1, KVOS_LINEAR_PANEL_BF16 = 2, KVOS_LINEAR_QMM = 3 };
/* The rows of a step a LoRA adapter's deltas apply to: num_ranges (start, end) pairs in ranges,
 * or num_ranges -1 for every row of the step. */
typedef struct { int64_t num_ranges; const int64_t *ranges; } kvos_row_set;
/* One adapter's delta on a GEMM: y[rows] += (x[rows] @ A^T) @ B^T, A (r, k) in narrow and B (n, r) in
 * wide float32 panels (ops.panel_pack; the scale folded into B), as userspace/programs/lora.py's LoraWeights;
 * b_k: each B panel's nonzero k range (kvos_panel_mm_kranges). Its rows are the step's
 * lora_rows[adapter] (the weights are made once, the rows every step). */
typedef struct { const float *a, *b; const int32_t *b_k; int64_t r, adapter; } kvos_lora_delta;
typedef struct {
    int kind;                  /* KVOS_LINEAR_*: float32 panels, bf16 panels, qmm blocks */
    const void *w;             /* the packed weights */
    const float *bias;         /* (n,) or NULL */
    int64_t n, k;              /* y (m, n) = x (m, k) @ W^T */
    int bits;                  /* qmm: 4 or 8 */
    const kvos_lora_delta *deltas;   /* LoRA adapters' deltas on this GEMM (float32 x only), or NULL */
    int64_t num_deltas;
} kvos_linear;
typedef struct { kvos_linear qkv, o, gate_up, down; } kvos_layer;
/* The step's buffers, dense rows of num_tokens: x the residual stream (in: the embeddings; out:
 * the stream after the last layer), h (in: RMSNorm(x) by norm 0; out: the last norm's output),
 * qkv, attn, gate_up, act, and delta (the O and down GEMMs' outputs); with LoRA deltas, lora_xa
 * (num_tokens x the largest r) and each adapter's rows,
 * else NULL. */
typedef struct {
    float *x, *h, *qkv, *attn, *gate_up, *act, *delta, *lora_xa;
    const kvos_row_set *lora_rows;
} kvos_step_buffers;
typedef struct {
    int64_t num_tokens, hidden, inter, num_heads, kv_heads, head_dim;
    float scale;
    const float *cos; int64_t cos_stride; const float *sin; int64_t sin_stride;
    const int32_t *positions; int64_t num_positions;
    void *k_cache0, *v_cache0;  /* layer 0's caches; layer l's start layer_stride * l elements on */
    int64_t layer_stride; int cache_kind;   /* KVOS_CACHE_* */
    int64_t num_frames, page_size, frame_stride, token_stride, head_stride;
    const int32_t *slot_mapping;
    const int32_t *page_table; int64_t page_table_stride, max_pages;
    const int32_t *query_start, *context_lens; int64_t num_seqs;
} kvos_step_shape;
/* norms: 2 * num_layers + 1 weights (layer l's input norm at 2l, its MLP norm at 2l + 1, the final
 * one last; 0 is applied by the caller). Returns a KVOS_E* code with bad[] as rope_write_kv and
 * paged_attention set them, KVOS_E_NOMEM, or 0. */
int kvos_layers(const kvos_layer *layers, int64_t num_layers, const float *const *norms, float eps,
                const kvos_step_buffers *buf, const kvos_step_shape *s, int check, int64_t *bad);

/* draw.c: one token a row drawn from rows x vocab float32 logits (row stride ld), each row with its
 * temperature (> 0), top_k (0 or >= vocab: every token), top_p in (0, 1], log of min_p (-inf: none)
 * and a uniform u in [0, 1) (kernel/ops/reference.py's draw_tokens is the contract). Returns
 * KVOS_E_NOMEM or 0; otherwise unchecked (kernel/ops/draw.py checks). */
int kvos_draw_tokens(const float *logits, int64_t ld, int64_t rows, int64_t vocab, const float *temperature,
                     const int32_t *top_k, const double *top_p, const float *log_min_p, const double *u,
                     int64_t *out);

int kvos_num_threads(void);
void kvos_set_num_threads(int n);
/* isa.c: the most a kernel's path may ask of the CPU (0 the best it has, 1 AVX2, 2 portable C), and
 * whether AVX-512 / AVX2 (+ FMA, F16C) paths may run under that cap on this CPU. */
void kvos_set_isa_cap(int cap);
int kvos_isa_cap(void);
int kvos_cpu_avx512(void);
int kvos_cpu_avx2(void);
/* cdef-end */
#define KVOS_ISA_BEST 0
#define KVOS_ISA_AVX2 1
#define KVOS_ISA_PORTABLE 2

/* The slot check write_kv and rope_write_kv run before writing anything: KVOS_OK, or
 * KVOS_E_SLOT with bad[0] = the token and bad[1] = its slot outside the pool's num_slots. */
static inline int kvos_check_slots(const int32_t *slot_mapping, int64_t num_tokens, int64_t num_slots,
                                   int64_t *bad)
{
    for (int64_t t = 0; t < num_tokens; t++)
        if (slot_mapping[t] < 0 || slot_mapping[t] >= num_slots) {
            bad[0] = t;
            bad[1] = slot_mapping[t];
            return KVOS_E_SLOT;
        }
    return KVOS_OK;
}

#endif
