/* kvos_math.h: the per-element math of the MMU kernels, written once for both targets.
 * Plain C static inline functions; under nvcc or NVRTC they become __host__ __device__,
 * so csrc/cpu (OpenMP loops) and csrc/cuda (thread blocks) run the same arithmetic:
 * slot and page-table address translation, causal positions, dot products, exp2 and
 * the online-softmax update. Scores are kept in log2 units (q is pre-scaled by
 * scale * log2(e)), so every exponential is an exp2. */
#ifndef KVOS_MATH_H
#define KVOS_MATH_H

#if defined(__CUDACC_RTC__)
/* NVRTC ships no libc headers: the fixed-width types are spelt out. */
typedef int int32_t;
typedef long long int64_t;
typedef unsigned int uint32_t;
typedef unsigned char uint8_t;
#else
#include <stdint.h>
#endif

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define KVOS_HD static __host__ __device__ __forceinline__
#define KVOS_RESTRICT __restrict__
#define KVOS_SIMD_SUM(var)
#define KVOS_SIMD_MAX(var)
#else
#define KVOS_HD static inline
#if defined(__cplusplus)   /* C++ hosts: the CUDA emulation used by the tests (csrc/emu) */
#define KVOS_RESTRICT __restrict__
#else
#define KVOS_RESTRICT restrict
#endif
/* Let gcc vectorise a float sum or max without -ffast-math (a reduction's order changes). */
#if defined(_OPENMP)
#define KVOS_PRAGMA(x) _Pragma(#x)
#define KVOS_SIMD_SUM(var) KVOS_PRAGMA(omp simd reduction(+:var))
#define KVOS_SIMD_MAX(var) KVOS_PRAGMA(omp simd reduction(max:var))
#else
#define KVOS_SIMD_SUM(var)
#define KVOS_SIMD_MAX(var)
#endif
#endif

/* A finite "minus infinity": running maxima start here, so max - max never makes a NaN. */
#define KVOS_NEG_BIG (-1.0e30f)
/* log2(e): q is multiplied by scale * KVOS_LOG2E so that softmax weights are exp2(s - m). */
#define KVOS_LOG2E 1.4426950408889634f

/* ---- address translation (the MMU) --------------------------------------------------- */

/* Element offset of token slot `slot` (= frame * page_size + offset) in a cache view whose
 * frames are frame_stride elements apart and whose tokens are token_stride apart. */
KVOS_HD int64_t kvos_slot_offset(int64_t slot, int64_t page_size, int64_t frame_stride, int64_t token_stride)
{
    return (slot / page_size) * frame_stride + (slot % page_size) * token_stride;
}

/* Element offset of context position `pos` of a sequence, read through its page-table row. */
KVOS_HD int64_t kvos_context_offset(const int32_t *page_row, int64_t pos, int64_t page_size,
                                    int64_t frame_stride, int64_t token_stride)
{
    return (int64_t)page_row[pos / page_size] * frame_stride + (pos % page_size) * token_stride;
}

/* Position of query i (0-based within its sequence's q_len new tokens) in a sequence whose
 * context, new tokens included, is context_len long. It attends to 0..position. */
KVOS_HD int64_t kvos_query_pos(int64_t context_len, int64_t q_len, int64_t i)
{
    return context_len - q_len + i;
}

/* The sequence that owns packed query row `row`: the last s with query_start[s] <= row
 * (sequences with no rows are skipped over). query_start has num_seqs + 1 entries. */
KVOS_HD int32_t kvos_seq_of_row(const int32_t *query_start, int32_t num_seqs, int32_t row)
{
    int32_t lo = 0, hi = num_seqs - 1;
    while (lo < hi) {
        int32_t mid = (lo + hi + 1) >> 1;
        if (query_start[mid] <= row) lo = mid; else hi = mid - 1;
    }
    return lo;
}

/* ---- arithmetic ------------------------------------------------------------------------ */

KVOS_HD float kvos_dot(const float *KVOS_RESTRICT a, const float *KVOS_RESTRICT b, int n)
{
    float s = 0.0f;
    KVOS_SIMD_SUM(s)
    for (int i = 0; i < n; i++)
        s += a[i] * b[i];
    return s;
}

/* 2^f for f in [-0.5, 0.5]: the Cephes exp2f polynomial (relative error ~2e-7), written
 * once for any type with + and * (a float, or the CPU kernels' vectors of floats). */
#define KVOS_EXP2_POLY(f) \
    ((((((1.535336188319500e-4f * (f) + 1.339887440266574e-3f) * (f) + 9.618437357674640e-3f) * (f) \
        + 5.550332471162809e-2f) * (f) + 2.402264791363012e-1f) * (f) + 6.931472028550421e-1f) * (f) + 1.0f)
/* Adding and subtracting 1.5 * 2^23 rounds a float to the nearest integer, no libm call. */
#define KVOS_ROUND_MAGIC 12582912.0f

/* 2^x for x <= 0 (larger x is clamped at 127). On the host, branch free so that gcc
 * vectorises loops over it: x = n + f, 2^n built in the exponent bits, 2^f by the
 * polynomial. On the GPU, the hardware exp2. */
KVOS_HD float kvos_exp2(float x)
{
#if defined(__CUDA_ARCH__)
    return exp2f(x);
#else
    x = x < -126.0f ? -126.0f : x;   /* below 2^-126 the weight is 0 to float precision */
    x = x > 127.0f ? 127.0f : x;
    float n = (x + KVOS_ROUND_MAGIC) - KVOS_ROUND_MAGIC;
    float f = x - n;
    union { int32_t i; float f; } scale;
    scale.i = ((int32_t)n + 127) << 23;
    return KVOS_EXP2_POLY(f) * scale.f;
#endif
}

/* Online softmax: a new block of scores whose maximum is block_max joins a running
 * (max *m, sum l). Updates *m and returns alpha, the factor by which the running sum and
 * the output accumulator must be scaled; the block's weights are then exp2(s - *m). */
KVOS_HD float kvos_softmax_rescale(float *m, float block_max)
{
    float m_new = block_max > *m ? block_max : *m;
    float alpha = kvos_exp2(*m - m_new);
    *m = m_new;
    return alpha;
}

/* Merge two partial softmax states (m_a, l_a) and (m_b, l_b) of the same row, computed over
 * disjoint parts of the context: returns the merged max in *m_a and sum in *l_a, and the
 * factors that scale each part's unnormalised accumulator. */
KVOS_HD void kvos_softmax_merge(float *m_a, float *l_a, float m_b, float l_b, float *alpha_a, float *alpha_b)
{
    float m = *m_a > m_b ? *m_a : m_b;
    *alpha_a = kvos_exp2(*m_a - m);
    *alpha_b = kvos_exp2(m_b - m);
    *l_a = *l_a * *alpha_a + l_b * *alpha_b;
    *m_a = m;
}

#endif
