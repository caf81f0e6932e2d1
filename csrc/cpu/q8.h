/* q8.h: K/V rows of an int8 cache (kvos_cpu.h's KVOS_CACHE_Q8): head_dim int8 codes followed by
 * their float32 scale, so a row is head_dim + 4 bytes and a cache row's address finds its scale.
 * Narrowing: scale = amax / 127, code = round-half-even(x / scale), clamped to +-127 (0 where
 * the scale is 0), the arithmetic of qmm.c's activation rows and of the torch twin
 * (kernel/kvcache.py q8_quantize), so write_kv stores the twin's bytes. Widening: code * scale,
 * one rounding, as the twin's dequantize. Plain loops: gcc vectorises them at -O3. */
#ifndef KVOS_Q8_H
#define KVOS_Q8_H
#include <math.h>
#include <stdint.h>
#include <string.h>

#define KVOS_Q8_SCALE_BYTES 4

static inline float kvos_q8_scale(const int8_t *row, int64_t n)
{
    float s;
    memcpy(&s, row + n, sizeof s);      /* rows of odd head sizes need not be 4-byte aligned */
    return s;
}

static inline void kvos_narrow_q8(int8_t *restrict dst, const float *restrict src, int64_t n)
{
    /* Comparisons, not fmaxf/fminf (which gcc leaves as libm calls, one an element): the same
     * results, a NaN input ignored by the max and clamped to -127, and the loops vectorise. */
    float amax = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        const float a = fabsf(src[i]);
        amax = a > amax ? a : amax;
    }
    const float scale = amax / 127.0f;
    for (int64_t i = 0; i < n; i++) {
        /* x / scale, not x * (1/scale): the twin divides too, so both round the same way */
        float v = scale > 0.0f ? nearbyintf(src[i] / scale) : 0.0f;
        v = v >= -127.0f ? v : -127.0f;
        v = v <= 127.0f ? v : 127.0f;
        dst[i] = (int8_t)v;
    }
    memcpy(dst + n, &scale, sizeof scale);
}

static inline void kvos_widen_q8(float *restrict dst, const int8_t *restrict src, int64_t n)
{
    const float scale = kvos_q8_scale(src, n);
    for (int64_t i = 0; i < n; i++)
        dst[i] = (float)src[i] * scale;
}

#endif
