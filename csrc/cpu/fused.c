/* fused.c: the fused layer ops on the CPU (residual add + RMSNorm, RoPE + write_kv, SiLU x up),
 * float32 activations, the per-element math of csrc/common/kvos_layers.h (shared with fused.cu).
 * Unchecked apart from rope_write_kv's index pre-pass (kernel/ops/fused.py and step_ops.py check
 * shapes, dtypes and strides). At decode sizes one call touches a few KB: threads only for prefill. */
#include <string.h>
#include "kvos_cpu.h"
#include "kvos_layers.h"
#include "kvrow.h"
#include "simd.h"

/* Threads pay off only past this many elements (a few microseconds of work a thread). */
#define KVOS_FUSED_PARALLEL (1 << 16)

void kvos_add_rms_norm(float *residual, int64_t res_stride, const float *delta, int64_t delta_stride,
                       const float *weight, float *out, int64_t out_stride, int64_t rows, int64_t n, float eps)
{
    #pragma omp parallel for schedule(static) num_threads(kvos_num_threads()) if (rows * n > KVOS_FUSED_PARALLEL)
    for (int64_t r = 0; r < rows; r++) {
        float *KVOS_RESTRICT x = residual + r * res_stride;
        const float *KVOS_RESTRICT d = delta + r * delta_stride;
        float sum_sq = 0.0f;
        KVOS_SIMD_SUM(sum_sq)
        for (int64_t i = 0; i < n; i++) {
            float s = x[i] + d[i];
            x[i] = s;
            sum_sq += s * s;
        }
        float scale = kvos_rms_scale(sum_sq, (int)n, eps);
        float *y = out + r * out_stride;     /* may be the residual row itself: read x[i] before y[i] */
        #pragma omp simd
        for (int64_t i = 0; i < n; i++)
            y[i] = x[i] * scale * weight[i];
    }
}

void kvos_rms_norm(const float *x, int64_t x_stride, const float *weight, float *out, int64_t out_stride,
                   int64_t rows, int64_t n, float eps)
{
    #pragma omp parallel for schedule(static) num_threads(kvos_num_threads()) if (rows * n > KVOS_FUSED_PARALLEL)
    for (int64_t r = 0; r < rows; r++) {
        const float *KVOS_RESTRICT xr = x + r * x_stride;
        float sum_sq = 0.0f;
        KVOS_SIMD_SUM(sum_sq)
        for (int64_t i = 0; i < n; i++)
            sum_sq += xr[i] * xr[i];
        float scale = kvos_rms_scale(sum_sq, (int)n, eps);
        float *y = out + r * out_stride;
        #pragma omp simd
        for (int64_t i = 0; i < n; i++)
            y[i] = xr[i] * scale * weight[i];
    }
}

/* One head vector rotated: y may be x (in place), both dense head_dim floats. */
static inline void rope_row(float *y, const float *x, const float *cos, const float *sin, int64_t half)
{
    #pragma omp simd
    for (int64_t i = 0; i < half; i++) {
        float x1 = x[i], x2 = x[i + half], y1, y2;
        kvos_rope_pair(x1, x2, cos[i], cos[i + half], sin[i], &y1, &y2);
        y[i] = y1;
        y[i + half] = y2;
    }
}

int kvos_rope_write_kv(float *q, int64_t q_tok_stride, int64_t q_head_stride, int64_t num_heads,
                       const float *k, int64_t k_tok_stride, int64_t k_head_stride,
                       const float *v, int64_t v_tok_stride, int64_t v_head_stride,
                       const float *cos, int64_t cos_stride, const float *sin, int64_t sin_stride,
                       const int32_t *positions, int64_t num_positions,
                       void *k_cache, void *v_cache, int cache_kind, int64_t num_frames, int64_t page_size,
                       int64_t frame_stride, int64_t token_stride, int64_t head_stride,
                       const int32_t *slot_mapping, int64_t num_tokens, int64_t kv_heads, int64_t head_dim,
                       int check, int64_t *bad)
{
    if (check) {     /* every index first: a bad one leaves q and the pool untouched */
        for (int64_t t = 0; t < num_tokens; t++)
            if (positions[t] < 0 || positions[t] >= num_positions) {
                bad[0] = t;
                bad[1] = positions[t];
                return KVOS_E_POSITION;
            }
        int rc = kvos_check_slots(slot_mapping, num_tokens, num_frames * page_size, bad);
        if (rc != KVOS_OK)
            return rc;
    }
    const int64_t half = head_dim / 2;
    #pragma omp parallel for schedule(static) num_threads(kvos_num_threads()) \
        if (num_tokens * (num_heads + kv_heads) * head_dim > KVOS_FUSED_PARALLEL)
    for (int64_t t = 0; t < num_tokens; t++) {
        const float *c = cos + positions[t] * cos_stride, *s = sin + positions[t] * sin_stride;
        for (int64_t h = 0; h < num_heads; h++) {
            float *qr = q + t * q_tok_stride + h * q_head_stride;
            rope_row(qr, qr, c, s, half);
        }
        const int64_t base = kvos_slot_offset(slot_mapping[t], page_size, frame_stride, token_stride);
        float row[head_dim];      /* the rotated key, when the cache narrows it */
        for (int64_t h = 0; h < kv_heads; h++) {
            const int64_t at = base + h * head_stride;
            const float *kr = k + t * k_tok_stride + h * k_head_stride, *vr = v + t * v_tok_stride + h * v_head_stride;
            if (cache_kind == KVOS_CACHE_F32) {
                rope_row((float *)k_cache + at, kr, c, s, half);
            } else {
                rope_row(row, kr, c, s, half);
                kvos_store_row(k_cache, cache_kind, at, row, head_dim);
            }
            kvos_store_row(v_cache, cache_kind, at, vr, head_dim);
        }
    }
    return KVOS_OK;
}

void kvos_silu_mul(const float *gate_up, int64_t gu_stride, float *out, int64_t out_stride, int64_t rows, int64_t inter)
{
    #pragma omp parallel for schedule(static) num_threads(kvos_num_threads()) if (rows * inter > KVOS_FUSED_PARALLEL)
    for (int64_t r = 0; r < rows; r++) {
        const float *KVOS_RESTRICT g = gate_up + r * gu_stride, *KVOS_RESTRICT u = g + inter;
        float *KVOS_RESTRICT y = out + r * out_stride;
        int64_t i = 0;
        for (; i + 8 <= inter; i += 8) {     /* kvos_silu on 8 lanes: same clamps and polynomial */
            const v8 gv = *(const v8_u *)(g + i);
            *(v8_u *)(y + i) = gv / (1.0f + v8exp2(-gv * KVOS_LOG2E)) * *(const v8_u *)(u + i);
        }
        for (; i < inter; i++)
            y[i] = kvos_silu(g[i]) * u[i];
    }
}
