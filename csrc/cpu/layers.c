/* layers.c: a forward step's decoder layers in one call, on the CPU in float32 activations.
 *
 * The same kernels, in the same order, on the same buffers as the per-op forward of
 * userspace/programs/llama.py (forward_fused), so the results are its results to the bit:
 * per layer, the QKV GEMM (+ bias), RoPE + K/V write, paged attention, the O GEMM (+ bias),
 * residual add + RMSNorm, the gate/up GEMM, SiLU x up, the down GEMM, residual add + RMSNorm.
 * What it saves is the Python between them: at one decode row a layer's nine calls cost ~110 us
 * of interpreter and argument marshalling against ~150 us of C (docs/performance.md, section 11).
 * Weights come as kvos_linear descriptors made once per program (kernel/ops/step_ops.py checks
 * them), with the LoRA deltas of the step's adapters where it has any (LayerWeights.with_deltas);
 * the step's arguments are checked there once a step, indices here on layer 0 only (every layer
 * reuses them), before layer 0 writes the cache. */
#include "kvos_cpu.h"
#include "kvrow.h"

/* The LoRA deltas on one GEMM's output y (m, L->n), after its bias: per adapter and range of its
 * rows, x A^T (A in narrow panels) into the scratch rows, then its product with B^T (wide panels, only
 * each panel's nonzero k rows) added to y in the panels' store, as LoraLinear.mm adds each delta:
 * y + (the delta's sum), element by element (panel_mm computes a row alone, so a range gives the bits
 * the rows' gathered GEMM gives). */
static void lora_deltas(const kvos_linear *L, const float *x, float *y, int64_t m, const kvos_step_buffers *buf)
{
    for (int64_t i = 0; i < L->num_deltas; i++) {
        const kvos_lora_delta *D = &L->deltas[i];
        const kvos_row_set *rows_of = &buf->lora_rows[D->adapter];
        const int64_t every[2] = {0, m};
        const int64_t num = rows_of->num_ranges < 0 ? 1 : rows_of->num_ranges;
        const int64_t *ranges = rows_of->num_ranges < 0 ? every : rows_of->ranges;
        for (int64_t g = 0; g < num; g++) {
            const int64_t start = ranges[2 * g], rows = ranges[2 * g + 1] - start;
            kvos_panel_mm_narrow(buf->lora_xa, D->r, x + start * L->k, L->k, D->a, NULL, rows, L->k, D->r, 0);
            kvos_panel_mm_kranges(y + start * L->n, L->n, buf->lora_xa, D->r, D->b, D->b_k, rows, D->r, L->n, 1);
        }
    }
}

/* One GEMM y (m, L->n) = x (m, L->k) @ W^T (+ bias) (+ LoRA deltas), dense rows. Panels add the bias
 * inside their tile (as ops.panel_mm does); qmm's output gets it after (as qlinear.mm does). */
static int linear(const kvos_linear *L, const float *x, float *y, int64_t m, const kvos_step_buffers *buf)
{
    int rc = KVOS_OK;
    switch (L->kind) {
    case KVOS_LINEAR_PANEL:
        kvos_panel_mm(y, L->n, x, L->k, (const float *)L->w, L->bias, m, L->k, L->n, 0);
        break;
    case KVOS_LINEAR_PANEL_BF16:
        rc = kvos_panel_mm_bf16(y, L->n, x, 0, L->k, (const uint16_t *)L->w, L->bias, m, L->k, L->n, 0, 0);
        break;
    case KVOS_LINEAR_QMM:
        rc = kvos_qmm(y, L->n, x, L->k, m, L->k, (const uint8_t *)L->w, L->n, L->bits, 0);
        if (rc == KVOS_OK && L->bias)
            for (int64_t r = 0; r < m; r++)
                for (int64_t j = 0; j < L->n; j++)
                    y[r * L->n + j] += L->bias[j];
        break;
    default:
        return KVOS_E_KIND;
    }
    if (rc == KVOS_OK && L->num_deltas)
        lora_deltas(L, x, y, m, buf);
    return rc;
}

int kvos_layers(const kvos_layer *layers, int64_t num_layers, const float *const *norms, float eps,
                const kvos_step_buffers *buf, const kvos_step_shape *s, int check, int64_t *bad)
{
    const int64_t n = s->num_tokens, hidden = s->hidden, d = s->head_dim;
    const int64_t q_size = s->num_heads * d, k_end = (s->num_heads + s->kv_heads) * d;
    const int64_t qkv_width = k_end + s->kv_heads * d, elem = kvos_cache_elem_bytes(s->cache_kind);
    for (int64_t l = 0; l < num_layers; l++) {
        const kvos_layer *W = &layers[l];
        const int first = check && l == 0;
        char *k_cache = (char *)s->k_cache0 + l * s->layer_stride * elem;
        char *v_cache = (char *)s->v_cache0 + l * s->layer_stride * elem;
        int rc = linear(&W->qkv, buf->h, buf->qkv, n, buf);
        if (rc == KVOS_OK)
            rc = kvos_rope_write_kv(buf->qkv, qkv_width, d, s->num_heads, buf->qkv + q_size, qkv_width, d,
                                    buf->qkv + k_end, qkv_width, d, s->cos, s->cos_stride, s->sin, s->sin_stride,
                                    s->positions, s->num_positions, k_cache, v_cache, s->cache_kind,
                                    s->num_frames, s->page_size, s->frame_stride, s->token_stride, s->head_stride,
                                    s->slot_mapping, n, s->kv_heads, d, first, bad);
        if (rc == KVOS_OK)
            rc = kvos_paged_attention(buf->attn, q_size, d, buf->qkv, qkv_width, d, k_cache, v_cache,
                                      s->cache_kind, s->num_frames, s->page_size, s->frame_stride,
                                      s->token_stride, s->head_stride, s->page_table, s->page_table_stride,
                                      s->max_pages, s->query_start, s->context_lens, s->num_seqs, n,
                                      s->num_heads, s->kv_heads, d, s->scale, first, bad);
        if (rc == KVOS_OK)
            rc = linear(&W->o, buf->attn, buf->delta, n, buf);
        if (rc != KVOS_OK)
            return rc;
        kvos_add_rms_norm(buf->x, hidden, buf->delta, hidden, norms[2 * l + 1], buf->h, hidden, n, hidden, eps);
        rc = linear(&W->gate_up, buf->h, buf->gate_up, n, buf);
        if (rc == KVOS_OK) {
            kvos_silu_mul(buf->gate_up, 2 * s->inter, buf->act, s->inter, n, s->inter);
            rc = linear(&W->down, buf->act, buf->delta, n, buf);
        }
        if (rc != KVOS_OK)
            return rc;
        kvos_add_rms_norm(buf->x, hidden, buf->delta, hidden, norms[2 * l + 2], buf->h, hidden, n, hidden, eps);
    }
    return KVOS_OK;
}
