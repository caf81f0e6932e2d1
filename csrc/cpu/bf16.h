/* bf16.h: bfloat16 <-> float32 for the CPU kernels' bf16 caches (the upper 16 bits of a float).
 * Widening is exact; narrowing rounds to nearest even, as torch's .to(torch.bfloat16) does, so
 * write_kv stores the same bits as its twin. Plain loops: gcc vectorises them at -O3. */
#ifndef KVOS_BF16_H
#define KVOS_BF16_H
#include <stdint.h>
#include <string.h>

static inline float kvos_bf16_to_float(uint16_t x)
{
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t kvos_float_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u)            /* NaN: keep it a (quiet) NaN */
        return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline void kvos_widen_bf16(float *restrict dst, const uint16_t *restrict src, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        dst[i] = kvos_bf16_to_float(src[i]);
}

static inline void kvos_narrow_bf16(uint16_t *restrict dst, const float *restrict src, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        dst[i] = kvos_float_to_bf16(src[i]);
}

#endif
