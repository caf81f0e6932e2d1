/* Frame copies for copy-on-write and swap: whole frames, in parallel over the list.
 * The checked entry point validates the whole list before the first byte moves. */
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include "kvos_cpu.h"

void kvos_copy_frames(const uint8_t *src_pool, uint8_t *dst_pool, int64_t frame_bytes,
                      const int32_t *src, const int32_t *dst, int64_t n)
{
    #pragma omp parallel for schedule(static) num_threads(kvos_num_threads()) if (n * frame_bytes > (1 << 20))
    for (int64_t i = 0; i < n; i++)
        memcpy(dst_pool + (int64_t)dst[i] * frame_bytes, src_pool + (int64_t)src[i] * frame_bytes,
               (size_t)frame_bytes);
}

/* Range, then repeats, then overlap, each reported at the first culprit in list order
 * (kernel/ops/validate.py:frame_lists reports the same one). Bitmaps over the pools. */
static int check_frame_lists(const int32_t *src, int64_t src_count, const int32_t *dst, int64_t dst_count,
                             int64_t n, int same_pool, int64_t *bad)
{
    for (int64_t i = 0; i < n; i++) {
        if (src[i] < 0 || src[i] >= src_count) { bad[0] = i; bad[1] = 0; return KVOS_E_INDEX; }
        if (dst[i] < 0 || dst[i] >= dst_count) { bad[0] = i; bad[1] = 1; return KVOS_E_INDEX; }
    }
    uint8_t *seen = calloc((size_t)(dst_count / 8 + 1), 1);
    uint8_t *is_src = same_pool ? calloc((size_t)(src_count / 8 + 1), 1) : NULL;
    int rc = KVOS_OK;
    if (!seen || (same_pool && !is_src))
        rc = KVOS_E_NOMEM;
    for (int64_t i = 0; i < n && rc == KVOS_OK; i++) {
        int32_t d = dst[i];
        if (seen[d >> 3] & (1u << (d & 7))) { bad[0] = i; rc = KVOS_E_DUPLICATE; }
        seen[d >> 3] |= (uint8_t)(1u << (d & 7));
    }
    if (same_pool && rc == KVOS_OK) {
        for (int64_t i = 0; i < n; i++)
            is_src[src[i] >> 3] |= (uint8_t)(1u << (src[i] & 7));
        for (int64_t i = 0; i < n && rc == KVOS_OK; i++)
            if (is_src[dst[i] >> 3] & (1u << (dst[i] & 7))) { bad[0] = i; rc = KVOS_E_OVERLAP; }
    }
    free(seen);
    free(is_src);
    return rc;
}

int kvos_copy_frames_checked(const uint8_t *src_pool, uint8_t *dst_pool, int64_t frame_bytes,
                             const int32_t *src, int64_t src_count, const int32_t *dst, int64_t dst_count,
                             int64_t n, int same_pool, int check, int64_t *bad)
{
    if (check) {
        int rc = check_frame_lists(src, src_count, dst, dst_count, n, same_pool, bad);
        if (rc != KVOS_OK)
            return rc;
    }
    kvos_copy_frames(src_pool, dst_pool, frame_bytes, src, dst, n);
    return KVOS_OK;
}

/* Thread count of every kvos parallel region. It is passed to each region explicitly
 * (omp_set_num_threads only binds the calling thread, and ops may run on any Python thread). */
static int kvos_threads = 0;

int kvos_num_threads(void) { return kvos_threads > 0 ? kvos_threads : omp_get_max_threads(); }

void kvos_set_num_threads(int n)
{
    kvos_threads = n > 0 ? n : 0;
    if (n > 0)
        omp_set_num_threads(n);
}
