/* Frame copies for copy-on-write and swap: whole frames, in parallel over the list. */
#include <string.h>
#include <omp.h>
#include "kvos_cpu.h"

void kvos_copy_frames(const uint8_t *src_pool, uint8_t *dst_pool, int64_t frame_bytes,
                      const int32_t *src, const int32_t *dst, int64_t n)
{
    #pragma omp parallel for schedule(static) if (n * frame_bytes > (1 << 20))
    for (int64_t i = 0; i < n; i++)
        memcpy(dst_pool + (int64_t)dst[i] * frame_bytes, src_pool + (int64_t)src[i] * frame_bytes,
               (size_t)frame_bytes);
}

int kvos_num_threads(void) { return omp_get_max_threads(); }
