/* kvrow.h: one K or V row stored into a cache of any kind (kvos_cpu.h's KVOS_CACHE_*), the one
 * place write_kv.c and fused.c's rope_write_kv decide how a float32 row becomes cache bytes. */
#ifndef KVOS_KVROW_H
#define KVOS_KVROW_H
#include <stdint.h>
#include <string.h>
#include "kvos_cpu.h"
#include "bf16.h"
#include "q8.h"

/* Bytes of one element of the kind (strides and offsets count these). */
static inline int64_t kvos_cache_elem_bytes(int kind)
{
    return kind == KVOS_CACHE_BF16 ? 2 : kind == KVOS_CACHE_Q8 ? 1 : 4;
}

/* cache + at (in elements of the kind) = the row src of n floats. */
static inline void kvos_store_row(void *cache, int kind, int64_t at, const float *src, int64_t n)
{
    switch (kind) {
    case KVOS_CACHE_BF16: kvos_narrow_bf16((uint16_t *)cache + at, src, n); break;
    case KVOS_CACHE_Q8: kvos_narrow_q8((int8_t *)cache + at, src, n); break;
    default: memcpy((float *)cache + at, src, (size_t)n * sizeof(float));
    }
}

#endif
