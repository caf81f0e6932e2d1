/* Paged attention on CUDA: the same contract and the same math (csrc/common/kvos_math.h)
 * as csrc/cpu/attention.c. One thread block per (query row, kv head, context partition):
 * it holds the GQA group of query heads of that kv head, so each K/V row is read once
 * for all of them. Threads in groups of `lpt` lanes read one K row each (16-byte loads),
 * the block takes the softmax of its partition, then threads over (d, token slices)
 * accumulate P V. Long contexts are split into partitions written as partial softmax
 * states (m, l, unnormalised output) that kvos_attention_combine_* merges. */
#include "kvos_cuda.cuh"
#include "attention_args.cuh"

#define THREADS 128
#define G_BATCH 4   /* query heads whose P V accumulators a thread holds at once */
#ifndef UNROLL
#define UNROLL 4    /* K or V rows a thread loads before it uses any: loads in flight */
#endif
#ifndef MIN_BLOCKS
#define MIN_BLOCKS 6   /* blocks per SM the registers must allow (6: 2.59 TB/s on an H200, 1: 2.15) */
#endif

__device__ __forceinline__ float warp_max(float x)
{
    for (int o = 16; o > 0; o >>= 1)
        x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

__device__ __forceinline__ float warp_sum(float x)
{
    for (int o = 16; o > 0; o >>= 1)
        x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

/* Lanes per K row: the largest power of two <= min(32, chunks of VEC elements per row). */
__device__ __forceinline__ int lanes_per_row(int chunks)
{
    int lpt = 1;
    while (lpt * 2 <= chunks && lpt * 2 <= 32)
        lpt *= 2;
    return lpt;
}

template <typename T, int VEC>
__device__ void paged_attention(const attn_args &a)
{
    extern __shared__ int64_t smem[];
    const int row = blockIdx.x, h = blockIdx.y, part = blockIdx.z;
    const int G = a.group, D = a.head_dim, PS = a.partition_size;
    const int32_t s = kvos_seq_of_row(a.query_start, a.num_seqs, row);
    const int64_t q_len = a.query_start[s + 1] - a.query_start[s];
    const int64_t n_ctx = kvos_query_pos(a.context_lens[s], q_len, row - a.query_start[s]) + 1;
    const int64_t t_begin = (int64_t)part * PS;
    if (t_begin >= n_ctx)
        return;   /* this partition lies past the row's context: combine never reads it */
    const int n = (int)(n_ctx - t_begin < PS ? n_ctx - t_begin : PS);

    const int NCH = D / VEC;                           /* VEC-element chunks per row */
    const int NCHT = NCH < THREADS ? NCH : THREADS;    /* threads across d in the P V step */
    const int slices = THREADS / NCHT;                 /* token slices in the P V step */
    int64_t *row_off = smem;                           /* PS: element offset of each token's K/V row */
    float *q_s = reinterpret_cast<float *>(row_off + PS);   /* G x D, scaled queries */
    float *p_s = q_s + G * D;                          /* G x PS, scores then weights */
    float *red = p_s + G * PS;                         /* slices x G_BATCH x D, P V partial sums */
    float *m_s = red + slices * G_BATCH * D;           /* G: partition max */
    float *l_s = m_s + G;                              /* G: partition sum of weights */

    /* Address translation, once per token for the whole block. */
    const int32_t *page_row = a.page_table + (int64_t)s * a.page_table_stride;
    for (int t = threadIdx.x; t < n; t += THREADS)
        row_off[t] = kvos_context_offset(page_row, t_begin + t, a.page_size, a.frame_stride, a.token_stride)
                   + h * a.head_stride;
    const T *q = static_cast<const T *>(a.q) + (int64_t)row * a.q_tok_stride;
    for (int i = threadIdx.x; i < G * D; i += THREADS)
        q_s[i] = kvos_to_float(q[(int64_t)(h * G + i / D) * a.q_head_stride + i % D]) * a.q_scale;
    __syncthreads();

    /* Scores: each group of lpt lanes takes UNROLL tokens at once (UNROLL independent 16-byte
     * loads per lane), and reduces only the query heads the group has. Measured on an H200
     * (benchmarks/gpu_attention_variants.py, LLaMA-7B shape, 256 x 4096): skipping the shuffles
     * of absent heads took 11.8 ms to 7.9; UNROLL 4 with registers capped for 6 blocks per SM,
     * 6.6 ms (2.6 TB/s); UNROLL 8 spilled to 13 ms. Loops and head tests are warp-uniform. */
    const T *k_cache = static_cast<const T *>(a.k_cache), *v_cache = static_cast<const T *>(a.v_cache);
    const int lpt = lanes_per_row(NCH), per_warp = 32 / lpt, per_pass = (THREADS / 32) * per_warp;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gi = lane / lpt, li = lane % lpt;
    for (int base = warp * per_warp; base < n; base += per_pass * UNROLL) {
        const T *krow[UNROLL];
        bool valid[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            const int t = base + u * per_pass + gi;
            valid[u] = t < n;
            krow[u] = k_cache + (valid[u] ? row_off[t] : row_off[0]);
        }
        for (int g0 = 0; g0 < G; g0 += 8) {
            float part_dot[UNROLL][8];
#pragma unroll
            for (int u = 0; u < UNROLL; u++)
#pragma unroll
                for (int j = 0; j < 8; j++)
                    part_dot[u][j] = 0.0f;
            for (int c = li; c < NCH; c += lpt) {
                float kf[UNROLL][VEC];
#pragma unroll
                for (int u = 0; u < UNROLL; u++)
                    kvos_load<T, VEC>(krow[u] + c * VEC, kf[u]);   /* in range even when !valid */
#pragma unroll
                for (int j = 0; j < 8; j++)
                    if (g0 + j < G)
#pragma unroll
                        for (int u = 0; u < UNROLL; u++)
                            part_dot[u][j] += kvos_dot(kf[u], q_s + (g0 + j) * D + c * VEC, VEC);
            }
#pragma unroll
            for (int j = 0; j < 8; j++) {
                if (g0 + j >= G)
                    break;
#pragma unroll
                for (int u = 0; u < UNROLL; u++) {
                    float x = part_dot[u][j];
                    for (int o = lpt / 2; o > 0; o >>= 1)
                        x += __shfl_xor_sync(0xffffffffu, x, o);
                    if (valid[u] && li == 0)
                        p_s[(g0 + j) * PS + base + u * per_pass + gi] = x;
                }
            }
        }
    }
    __syncthreads();

    /* Softmax of the partition, one warp per query head. */
    for (int g = warp; g < G; g += THREADS / 32) {
        float mx = KVOS_NEG_BIG;
        for (int t = lane; t < n; t += 32)
            mx = fmaxf(mx, p_s[g * PS + t]);
        mx = warp_max(mx);
        float sum = 0.0f;
        for (int t = lane; t < n; t += 32) {
            float p = kvos_exp2(p_s[g * PS + t] - mx);
            p_s[g * PS + t] = p;
            sum += p;
        }
        sum = warp_sum(sum);
        if (lane == 0) {
            m_s[g] = mx;
            l_s[g] = sum;
        }
    }
    __syncthreads();

    /* P V: thread (slice, chunk) sums its tokens; slices are then added in shared memory. */
    const int slice = threadIdx.x / NCHT, chunk0 = threadIdx.x % NCHT;
    for (int g0 = 0; g0 < G; g0 += G_BATCH) {
        if (slice < slices) {
            for (int c = chunk0; c < NCH; c += NCHT) {
                float acc[G_BATCH][VEC];
#pragma unroll
                for (int j = 0; j < G_BATCH; j++)
#pragma unroll
                    for (int e = 0; e < VEC; e++)
                        acc[j][e] = 0.0f;
                /* UNROLL rows of V in flight per thread, as for K above. */
                for (int t0 = slice; t0 < n; t0 += slices * UNROLL) {
                    float vf[UNROLL][VEC];
#pragma unroll
                    for (int u = 0; u < UNROLL; u++) {
                        const int t = t0 + u * slices;
                        kvos_load<T, VEC>(v_cache + row_off[t < n ? t : t0] + c * VEC, vf[u]);
                    }
#pragma unroll
                    for (int u = 0; u < UNROLL; u++) {
                        const int t = t0 + u * slices;
                        if (t >= n)
                            break;
#pragma unroll
                        for (int j = 0; j < G_BATCH; j++) {
                            const float p = g0 + j < G ? p_s[(g0 + j) * PS + t] : 0.0f;
#pragma unroll
                            for (int e = 0; e < VEC; e++)
                                acc[j][e] += p * vf[u][e];
                        }
                    }
                }
#pragma unroll
                for (int j = 0; j < G_BATCH; j++)
#pragma unroll
                    for (int e = 0; e < VEC; e++)
                        red[(slice * G_BATCH + j) * D + c * VEC + e] = acc[j][e];
            }
        }
        __syncthreads();
        for (int i = threadIdx.x; i < G_BATCH * D; i += THREADS) {
            const int j = i / D, d = i % D, head = h * G + g0 + j;
            if (g0 + j >= G)
                continue;
            float x = 0.0f;
            for (int sl = 0; sl < slices; sl++)
                x += red[(sl * G_BATCH + j) * D + d];
            if (a.num_partitions == 1) {
                T *o = static_cast<T *>(a.out) + (int64_t)row * a.out_tok_stride + (int64_t)head * a.out_head_stride;
                o[d] = kvos_from_float<T>(x / l_s[g0 + j]);
            } else {
                const int64_t state = ((int64_t)row * a.num_heads + head) * a.num_partitions + part;
                a.part_acc[state * D + d] = x;
                if (d == 0) {
                    a.part_m[state] = m_s[g0 + j];
                    a.part_l[state] = l_s[g0 + j];
                }
            }
        }
        __syncthreads();
    }
}

/* Merge the partitions of one (row, head): the online-softmax merge of kvos_math.h. */
template <typename T>
__device__ void combine(const attn_args &a)
{
    const int row = blockIdx.x, head = blockIdx.y, D = a.head_dim;
    const int32_t s = kvos_seq_of_row(a.query_start, a.num_seqs, row);
    const int64_t q_len = a.query_start[s + 1] - a.query_start[s];
    const int64_t n_ctx = kvos_query_pos(a.context_lens[s], q_len, row - a.query_start[s]) + 1;
    const int used = (int)((n_ctx + a.partition_size - 1) / a.partition_size);
    const int64_t state0 = ((int64_t)row * a.num_heads + head) * a.num_partitions;
    T *o = static_cast<T *>(a.out) + (int64_t)row * a.out_tok_stride + (int64_t)head * a.out_head_stride;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float m = a.part_m[state0], l = a.part_l[state0], x = a.part_acc[state0 * D + d];
        for (int p = 1; p < used; p++) {
            float alpha_a, alpha_b;
            kvos_softmax_merge(&m, &l, a.part_m[state0 + p], a.part_l[state0 + p], &alpha_a, &alpha_b);
            x = x * alpha_a + a.part_acc[(state0 + p) * D + d] * alpha_b;
        }
        o[d] = kvos_from_float<T>(x / l);
    }
}

/* Entry points: dtype x (16-byte vector loads, or element loads for unaligned layouts). */
#define KVOS_ATTENTION(suffix, T, VEC) \
    extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS) kvos_paged_attention_##suffix(attn_args a) \
    { paged_attention<T, VEC>(a); }
KVOS_ATTENTION(f32, float, 4)
KVOS_ATTENTION(f16, kvos_half, 8)
KVOS_ATTENTION(bf16, kvos_bf16, 8)
KVOS_ATTENTION(f32_unaligned, float, 1)
KVOS_ATTENTION(f16_unaligned, kvos_half, 1)
KVOS_ATTENTION(bf16_unaligned, kvos_bf16, 1)

#define KVOS_COMBINE(suffix, T) \
    extern "C" __global__ void kvos_attention_combine_##suffix(attn_args a) { combine<T>(a); }
KVOS_COMBINE(f32, float)
KVOS_COMBINE(f16, kvos_half)
KVOS_COMBINE(bf16, kvos_bf16)
