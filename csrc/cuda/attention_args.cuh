/* attention_args.cuh: the one argument of the paged-attention kernels (attention.cu, v1 and
 * its partition merge; attention_v2.cu, the decode kernel, which wraps it). kernel/ops/cuda.py
 * packs it with a numpy dtype whose layout tests/test_ops_cuda.py compares with this struct. */
#ifndef KVOS_ATTENTION_ARGS_CUH
#define KVOS_ATTENTION_ARGS_CUH
#include "kvos_math.h"

struct attn_args {
    void *out; int64_t out_tok_stride, out_head_stride;
    const void *q; int64_t q_tok_stride, q_head_stride;
    const void *k_cache, *v_cache; int64_t page_size, frame_stride, token_stride, head_stride;
    const int32_t *page_table; int64_t page_table_stride;
    const int32_t *query_start, *context_lens; int32_t num_seqs;
    int32_t num_heads, group, head_dim;
    float q_scale;             /* softmax scale * log2(e) */
    int32_t partition_size, num_partitions;
    float *part_m, *part_l, *part_acc;   /* (row, head, partition) states when num_partitions > 1 */
};

#endif
