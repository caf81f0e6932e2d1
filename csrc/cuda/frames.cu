/* Frame copies on CUDA, for copy-on-write (pool to pool) and swap (pool to and from the
 * pinned host swap area, which the GPU reaches directly through unified addressing).
 * Block (i, chunk) copies one chunk of frame src[i] into frame dst[i]; 16-byte words when
 * frames and pools are 16-byte aligned, else bytes. */
#include "kvos_cuda.cuh"

#define CHUNK_BYTES 8192   /* bytes per block: a few per frame keeps every SM busy */

template <typename W>
__device__ void copy_frames(const unsigned char *src_pool, unsigned char *dst_pool, int64_t frame_bytes,
                            const int32_t *src, const int32_t *dst)
{
    const int64_t i = blockIdx.x, begin = (int64_t)blockIdx.y * CHUNK_BYTES;
    const int64_t end = begin + CHUNK_BYTES < frame_bytes ? begin + CHUNK_BYTES : frame_bytes;
    const W *from = reinterpret_cast<const W *>(src_pool + (int64_t)src[i] * frame_bytes);
    W *to = reinterpret_cast<W *>(dst_pool + (int64_t)dst[i] * frame_bytes);
    for (int64_t w = begin / (int64_t)sizeof(W) + threadIdx.x; w < end / (int64_t)sizeof(W); w += blockDim.x)
        to[w] = from[w];
}

extern "C" __global__ void kvos_copy_frames_16(const unsigned char *src_pool, unsigned char *dst_pool,
                                               int64_t frame_bytes, const int32_t *src, const int32_t *dst)
{
    copy_frames<kvos_16_bytes>(src_pool, dst_pool, frame_bytes, src, dst);
}

extern "C" __global__ void kvos_copy_frames_1(const unsigned char *src_pool, unsigned char *dst_pool,
                                              int64_t frame_bytes, const int32_t *src, const int32_t *dst)
{
    copy_frames<unsigned char>(src_pool, dst_pool, frame_bytes, src, dst);
}
