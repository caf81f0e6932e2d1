/* Fused per-token layer kernels on CUDA, one block per token, math from csrc/common/kvos_layers.h:
 * - add_rms_norm: residual += delta (rounded to the storage type), out = RMSNorm(residual) * weight;
 * - rope_write_kv: rotate q in place (rotate-half RoPE at the token's position) and write the
 *   rotated k and v into their cache slots (write_kv's slot arithmetic), k itself untouched;
 * - silu_mul: out = SiLU(gate) * up of a (tokens, 2 * inter) gate|up row.
 * Strided rows (any token stride, dense last dimension); fp32, fp16, bf16; float arithmetic. */
#include "kvos_cuda.cuh"
#include "kvos_layers.h"

namespace kvos_fused {

template <typename T>
__device__ void add_rms_norm(T *residual, int64_t residual_stride, const T *delta, int64_t delta_stride,
                             const T *weight, T *out, int64_t out_stride, int32_t hidden, float eps, float *red)
{
    const int64_t t = blockIdx.x;
    T *r = residual + t * residual_stride;
    const T *dl = delta + t * delta_stride;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const T sum = kvos_from_float<T>(kvos_to_float(r[i]) + kvos_to_float(dl[i]));
        r[i] = sum;   /* the stored residual is what the norm sees: the twin's order */
        const float x = kvos_to_float(sum);
        ss += x * x;
    }
    for (int o = 16; o > 0; o >>= 1)
        ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if (threadIdx.x % 32 == 0)
        red[threadIdx.x / 32] = ss;
    __syncthreads();
    float total = 0.0f;
    for (int w = 0; w < (int)(blockDim.x + 31) / 32; w++)
        total += red[w];
    const float scale = kvos_rms_scale(total, hidden, eps);
    T *o = out + t * out_stride;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)   /* the same i as above: own writes */
        o[i] = kvos_from_float<T>(kvos_to_float(r[i]) * scale * kvos_to_float(weight[i]));
}

template <typename T>
__device__ void rope_write_kv(T *q, int64_t q_tok_stride, int64_t q_head_stride, const T *k, int64_t k_tok_stride,
                              int64_t k_head_stride, const T *v, int64_t v_tok_stride, int64_t v_head_stride,
                              const T *cos, int64_t cos_stride, const T *sin, int64_t sin_stride,
                              const int32_t *positions, T *k_cache, T *v_cache, int64_t page_size,
                              int64_t frame_stride, int64_t token_stride, int64_t head_stride,
                              const int32_t *slot_mapping, int32_t num_heads, int32_t kv_heads, int32_t head_dim)
{
    const int64_t t = blockIdx.x;
    const int half = head_dim / 2;
    const T *c = cos + (int64_t)positions[t] * cos_stride, *s = sin + (int64_t)positions[t] * sin_stride;
    /* q: each thread owns whole (d, d + half) pairs, so rotating in place is safe. */
    for (int i = threadIdx.x; i < num_heads * half; i += blockDim.x) {
        const int h = i / half, d = i % half;
        T *x = q + t * q_tok_stride + (int64_t)h * q_head_stride;
        float y1, y2;
        kvos_rope_pair(kvos_to_float(x[d]), kvos_to_float(x[d + half]), kvos_to_float(c[d]),
                       kvos_to_float(c[d + half]), kvos_to_float(s[d]), &y1, &y2);
        x[d] = kvos_from_float<T>(y1);
        x[d + half] = kvos_from_float<T>(y2);
    }
    const int64_t base = kvos_slot_offset(slot_mapping[t], page_size, frame_stride, token_stride);
    for (int i = threadIdx.x; i < kv_heads * half; i += blockDim.x) {
        const int h = i / half, d = i % half;
        const T *x = k + t * k_tok_stride + (int64_t)h * k_head_stride;
        float y1, y2;
        kvos_rope_pair(kvos_to_float(x[d]), kvos_to_float(x[d + half]), kvos_to_float(c[d]),
                       kvos_to_float(c[d + half]), kvos_to_float(s[d]), &y1, &y2);
        k_cache[base + h * head_stride + d] = kvos_from_float<T>(y1);
        k_cache[base + h * head_stride + d + half] = kvos_from_float<T>(y2);
    }
    for (int i = threadIdx.x; i < kv_heads * head_dim; i += blockDim.x) {
        const int h = i / head_dim, d = i % head_dim;
        v_cache[base + h * head_stride + d] = v[t * v_tok_stride + (int64_t)h * v_head_stride + d];
    }
}

template <typename T>
__device__ void silu_mul(const T *gate_up, int64_t gate_up_stride, T *out, int64_t out_stride, int32_t inter)
{
    const int64_t t = blockIdx.x;
    const T *g = gate_up + t * gate_up_stride;
    for (int i = threadIdx.x; i < inter; i += blockDim.x)
        out[t * out_stride + i] = kvos_from_float<T>(kvos_silu(kvos_to_float(g[i])) * kvos_to_float(g[inter + i]));
}

}  // namespace kvos_fused

#define KVOS_FUSED(suffix, T) \
    extern "C" __global__ void kvos_add_rms_norm_##suffix(T *residual, int64_t residual_stride, const T *delta, \
        int64_t delta_stride, const T *weight, T *out, int64_t out_stride, int32_t hidden, float eps) \
    { \
        extern __shared__ int64_t smem[]; \
        kvos_fused::add_rms_norm<T>(residual, residual_stride, delta, delta_stride, weight, out, out_stride, \
                                    hidden, eps, reinterpret_cast<float *>(smem)); \
    } \
    extern "C" __global__ void kvos_rope_write_kv_##suffix(T *q, int64_t q_tok_stride, int64_t q_head_stride, \
        const T *k, int64_t k_tok_stride, int64_t k_head_stride, const T *v, int64_t v_tok_stride, \
        int64_t v_head_stride, const T *cos, int64_t cos_stride, const T *sin, int64_t sin_stride, \
        const int32_t *positions, T *k_cache, T *v_cache, int64_t page_size, int64_t frame_stride, \
        int64_t token_stride, int64_t head_stride, const int32_t *slot_mapping, int32_t num_heads, \
        int32_t kv_heads, int32_t head_dim) \
    { \
        kvos_fused::rope_write_kv<T>(q, q_tok_stride, q_head_stride, k, k_tok_stride, k_head_stride, v, \
                                     v_tok_stride, v_head_stride, cos, cos_stride, sin, sin_stride, positions, \
                                     k_cache, v_cache, page_size, frame_stride, token_stride, head_stride, \
                                     slot_mapping, num_heads, kv_heads, head_dim); \
    } \
    extern "C" __global__ void kvos_silu_mul_##suffix(const T *gate_up, int64_t gate_up_stride, T *out, \
                                                      int64_t out_stride, int32_t inter) \
    { kvos_fused::silu_mul<T>(gate_up, gate_up_stride, out, out_stride, inter); }
KVOS_FUSED(f32, float)
KVOS_FUSED(f16, kvos_half)
KVOS_FUSED(bf16, kvos_bf16)
