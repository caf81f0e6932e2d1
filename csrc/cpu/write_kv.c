/* write_kv: scatter the K and V of a step's new tokens into their cache slots.
 * Slots are checked first (all of them) so a bad slot leaves the pool untouched. */
#include <string.h>
#include "kvos_cpu.h"
#include "kvos_math.h"
#include "kvrow.h"

int kvos_write_kv(void *k_cache, void *v_cache, int cache_kind, int64_t num_frames, int64_t page_size,
                  int64_t frame_stride, int64_t token_stride, int64_t head_stride,
                  const float *k, const float *v, int64_t k_tok_stride, int64_t k_head_stride,
                  int64_t v_tok_stride, int64_t v_head_stride,
                  const int32_t *slot_mapping, int64_t num_tokens, int64_t kv_heads, int64_t head_dim,
                  int check, int64_t *bad)
{
    if (check) {
        int rc = kvos_check_slots(slot_mapping, num_tokens, num_frames * page_size, bad);
        if (rc != KVOS_OK)
            return rc;
    }
    /* Decode steps write a handful of tokens: threads only pay off for prefill chunks. */
    #pragma omp parallel for schedule(static) num_threads(kvos_num_threads()) \
        if (num_tokens * kv_heads * head_dim > (1 << 16))
    for (int64_t t = 0; t < num_tokens; t++) {
        int64_t base = kvos_slot_offset(slot_mapping[t], page_size, frame_stride, token_stride);
        for (int64_t h = 0; h < kv_heads; h++) {
            const int64_t at = base + h * head_stride;
            const float *kr = k + t * k_tok_stride + h * k_head_stride, *vr = v + t * v_tok_stride + h * v_head_stride;
            kvos_store_row(k_cache, cache_kind, at, kr, head_dim);
            kvos_store_row(v_cache, cache_kind, at, vr, head_dim);
        }
    }
    return KVOS_OK;
}
