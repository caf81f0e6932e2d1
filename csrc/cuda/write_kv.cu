/* write_kv on CUDA: scatter the new tokens' K and V into their cache slots. One block per
 * token, threads over (kv head, d). Element moves only, so one kernel per element size
 * serves every dtype. Slot arithmetic from csrc/common/kvos_math.h, as on the CPU. */
#include "kvos_cuda.cuh"

template <typename E>
__device__ void write_kv(E *k_cache, E *v_cache, int64_t page_size, int64_t frame_stride, int64_t token_stride,
                         int64_t head_stride, const E *k, const E *v, int64_t k_tok_stride, int64_t k_head_stride,
                         int64_t v_tok_stride, int64_t v_head_stride, const int32_t *slot_mapping, int32_t kv_heads,
                         int32_t head_dim)
{
    const int64_t t = blockIdx.x;
    const int64_t base = kvos_slot_offset(slot_mapping[t], page_size, frame_stride, token_stride);
    for (int i = threadIdx.x; i < kv_heads * head_dim; i += blockDim.x) {
        const int h = i / head_dim, d = i % head_dim;
        k_cache[base + h * head_stride + d] = k[t * k_tok_stride + h * k_head_stride + d];
        v_cache[base + h * head_stride + d] = v[t * v_tok_stride + h * v_head_stride + d];
    }
}

#define KVOS_WRITE_KV(suffix, E) \
    extern "C" __global__ void kvos_write_kv_##suffix( \
        E *k_cache, E *v_cache, int64_t page_size, int64_t frame_stride, int64_t token_stride, int64_t head_stride, \
        const E *k, const E *v, int64_t k_tok_stride, int64_t k_head_stride, int64_t v_tok_stride, \
        int64_t v_head_stride, const int32_t *slot_mapping, int32_t kv_heads, int32_t head_dim) \
    { \
        write_kv<E>(k_cache, v_cache, page_size, frame_stride, token_stride, head_stride, k, v, k_tok_stride, \
                    k_head_stride, v_tok_stride, v_head_stride, slot_mapping, kv_heads, head_dim); \
    }
KVOS_WRITE_KV(b32, unsigned int)
KVOS_WRITE_KV(b16, unsigned short)
