/* kvos CPU kernels: the C entry points that kernel/ops/cpu.py calls through cffi.
 * Everything between the cdef markers is parsed by cffi, so it must stay plain
 * declarations. Index arrays are int32; memory is passed as raw pointers plus
 * element strides so one frame pool can serve models of different shapes. */
#ifndef KVOS_CPU_H
#define KVOS_CPU_H
#include <stdint.h>
#include <stddef.h>

/* cdef-begin */
/* Copy whole frames: dst_pool[dst[i]] = src_pool[src[i]], frame_bytes each.
 * Serves copy-on-write (same pool) and swap (pool <-> host swap area). */
void kvos_copy_frames(const uint8_t *src_pool, uint8_t *dst_pool, int64_t frame_bytes,
                      const int32_t *src, const int32_t *dst, int64_t n);
int kvos_num_threads(void);
/* cdef-end */

#endif
