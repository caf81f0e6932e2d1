/* kvos_layers.h: the per-element math of the fused layer kernels (csrc/cuda/fused.cu), written
 * once for the GPU and the host (the CPU emulation of the CUDA kernels): RMSNorm's scale,
 * the rotate-half RoPE of one (d, d + half) pair, SiLU. Same conventions as the torch twins in
 * kernel/ops/reference.py; float arithmetic whatever the storage type. */
#ifndef KVOS_LAYERS_H
#define KVOS_LAYERS_H
#include "kvos_math.h"

/* 1 / sqrt(mean of squares + eps) of a row whose squares sum to sum_sq. */
KVOS_HD float kvos_rms_scale(float sum_sq, int n, float eps)
{
#if defined(__CUDA_ARCH__)
    return rsqrtf(sum_sq / (float)n + eps);
#else
    return 1.0f / __builtin_sqrtf(sum_sq / (float)n + eps);
#endif
}

/* Rotate-half RoPE of the pair (x1 = x[d], x2 = x[d + half]):
 * y[d] = x1 cos[d] - x2 sin[d], y[d + half] = x2 cos[d + half] + x1 sin[d]. */
KVOS_HD void kvos_rope_pair(float x1, float x2, float cos_lo, float cos_hi, float sin_d, float *y1, float *y2)
{
    *y1 = x1 * cos_lo - x2 * sin_d;
    *y2 = x2 * cos_hi + x1 * sin_d;
}

/* SiLU(x) = x / (1 + e^-x), through exp2; large |x| saturate to x or -0 without NaN. */
KVOS_HD float kvos_silu(float x)
{
    return x / (1.0f + kvos_exp2(-x * KVOS_LOG2E));
}

#endif
